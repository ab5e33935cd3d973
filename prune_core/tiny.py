"""Built-in random tiny models, one per supported family (`tiny-llama`, `tiny-mistral`, `tiny-qwen2`,
`tiny-qwen3`, `tiny-gemma2`, `tiny-gemma3`, `tiny-phi3`, `tiny-smollm3`), and their byte tokenizer.

Tests and demos need real modules of every family without a download: these are genuine
`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `Gemma2ForCausalLM`,
`Gemma3ForCausalLM`, `Phi3ForCausalLM` and `SmolLM3ForCausalLM` instances, 4 layers, hidden 64,
4 query heads over 2 KV heads (GQA), MLP width 128, small enough for hundreds of forward/backward
passes in a test run. Each keeps what sets its family apart: Qwen3's per-head q/k norms, Gemma's
sandwich norms, scaled tied embeddings, head_dim 24 ≠ hidden / heads, query_pre_attn_scalar and
sliding-window layers (window 16; Gemma 2 also soft-caps attention and final logits, so it runs the
eager attention, which sdpa cannot replace), Phi-3's fused qkv_proj / gate_up_proj, SmolLM3's
layers without RoPE. Weights come from a seeded `torch.Generator` filled in sorted parameter order,
so every machine builds the same model. Per-layer gains and per-row scales are drawn on purpose so
layers and groups differ in importance (a plain 0.02-std init makes every group look alike).

The tokenizer is a byte-level BPE with no merges, built in code: ids 0-255 are the bytes, then
`<s>`, `</s>`, `<pad>`. Like SmolLM2's, it adds no BOS token by itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from prune_core.adapters import adapter_for_type
from prune_core.errors import BadInput

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259
MAX_POSITIONS = 2048
ATTN_IMPLEMENTATION = "sdpa"

# Shared geometry of the tiny models.
HIDDEN = 64
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 128
# Gemma's heads are wider than hidden / heads (Gemma 2 2B: 8 × 256 over hidden 2304), and its
# attention scale comes from query_pre_attn_scalar, not from head_dim.
GEMMA_HEAD_DIM = 24
GEMMA_QUERY_PRE_ATTN_SCALAR = 32
SLIDING_WINDOW = 16
GEMMA_FAMILIES = ("gemma2", "gemma3_text")


@dataclass(frozen=True)
class TinySpec:
    key: str
    family: str
    description: str
    seed: int
    tie_word_embeddings: bool


TINY_MODELS: dict[str, TinySpec] = {
    spec.key: spec
    for spec in (
        TinySpec(
            "tiny-llama",
            "llama",
            "random tiny LLaMA (4 layers, hidden 64, 4 heads / 2 KV heads, tied embeddings); built in, for tests",
            seed=1001,
            tie_word_embeddings=True,
        ),
        TinySpec(
            "tiny-mistral",
            "mistral",
            "random tiny Mistral (4 layers, hidden 64, 4 heads / 2 KV heads); built in, for tests",
            seed=2002,
            tie_word_embeddings=False,
        ),
        TinySpec(
            "tiny-qwen2",
            "qwen2",
            "random tiny Qwen2 (4 layers, hidden 64, 4 heads / 2 KV heads, q/k/v biases); built in, for tests",
            seed=3003,
            tie_word_embeddings=True,
        ),
        TinySpec(
            "tiny-qwen3",
            "qwen3",
            "random tiny Qwen3 (4 layers, hidden 64, 4 heads / 2 KV heads, per-head q/k norms); built in, for tests",
            seed=4004,
            tie_word_embeddings=True,
        ),
        TinySpec(
            "tiny-gemma2",
            "gemma2",
            "random tiny Gemma 2 (4 layers, hidden 64, 4 heads × 24 / 2 KV heads, soft-capping, sliding window); "
            "built in, for tests",
            seed=5005,
            tie_word_embeddings=True,
        ),
        TinySpec(
            "tiny-gemma3",
            "gemma3_text",
            "random tiny Gemma 3 text (4 layers, hidden 64, 4 heads × 24 / 2 KV heads, q/k norms, sliding window); "
            "built in, for tests",
            seed=6006,
            tie_word_embeddings=True,
        ),
        TinySpec(
            "tiny-phi3",
            "phi3",
            "random tiny Phi-3 (4 layers, hidden 64, 4 heads / 2 KV heads, fused qkv_proj and gate_up_proj); "
            "built in, for tests",
            seed=7007,
            tie_word_embeddings=False,
        ),
        TinySpec(
            "tiny-smollm3",
            "smollm3",
            "random tiny SmolLM3 (4 layers, hidden 64, 4 heads / 2 KV heads, no RoPE in layer 3); built in, for tests",
            seed=8008,
            tie_word_embeddings=True,
        ),
    )
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (what `ByteLevel` pre-tokenization uses)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one id per byte (0-255) plus `<s>`=256, `</s>`=257, `<pad>`=258."""
    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab.update({BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )


def _spec(key: str) -> TinySpec:
    try:
        return TINY_MODELS[key]
    except KeyError:
        raise BadInput(f"unknown tiny model {key!r}", f"use one of: {', '.join(TINY_MODELS)}") from None


def make_config(key: str) -> PretrainedConfig:
    """The transformers config of a tiny model (no weights)."""
    spec = _spec(key)
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=0.02,
        use_cache=True,
    )
    gemma = dict(common, head_dim=GEMMA_HEAD_DIM, query_pre_attn_scalar=GEMMA_QUERY_PRE_ATTN_SCALAR,
                 sliding_window=SLIDING_WINDOW, hidden_activation="gelu_pytorch_tanh")
    family = spec.family
    if family == "llama":
        config: PretrainedConfig = LlamaConfig(**common)
    elif family == "mistral":
        config = MistralConfig(sliding_window=None, **common)
    elif family == "qwen2":
        config = Qwen2Config(use_sliding_window=False, **common)
    elif family == "qwen3":
        config = Qwen3Config(use_sliding_window=False, **common)
    elif family == "gemma2":  # alternating sliding / full layers, both soft-caps on
        config = Gemma2Config(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **gemma)
    elif family == "gemma3_text":  # Gemma 3's local:global pattern, shortened to 3:1
        layer_types = ["sliding_attention"] * (LAYERS - 1) + ["full_attention"]
        config = Gemma3TextConfig(layer_types=layer_types, **gemma)
    elif family == "phi3":
        config = Phi3Config(original_max_position_embeddings=MAX_POSITIONS, **common)
    else:  # smollm3: RoPE off in every 4th layer (no_rope_layers = [1, 1, 1, 0])
        config = SmolLM3Config(no_rope_layer_interval=4, **common)
    config._attn_implementation = adapter_for_type(family).attn_implementation or ATTN_IMPLEMENTATION
    return config


_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "smollm3": SmolLM3ForCausalLM,
}


def parameter_count(key: str) -> int:
    """Number of (unique) parameters of a tiny model, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = _CLASSES[_spec(key).family](make_config(key))
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _seeded_init(model: PreTrainedModel, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in sorted-name order (machine independent).

    Norm gains are drawn around 1; Gemma's RMSNorm multiplies by (1 + weight), so its weights are
    drawn around 0 for the same effective gain."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    norm_offset = 0.0 if model.config.model_type in GEMMA_FAMILIES else 1.0

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    layer_gain = torch.exp(0.4 * randn(LAYERS))  # some layers matter more than others
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        shape = tuple(param.shape)
        if name.endswith("norm.weight"):
            value = norm_offset + 0.1 * randn(*shape)
        elif name.endswith(".bias"):
            value = 0.1 * randn(*shape)
        elif "embed_tokens" in name:
            value = randn(*shape) / math.sqrt(shape[1]) * 2.0
        elif name.startswith("lm_head"):
            value = randn(*shape) / math.sqrt(shape[1])
        else:  # a decoder-layer projection: per-layer gain, per-output-row log-normal scale
            layer = int(name.split("layers.")[1].split(".")[0])
            row_scale = torch.exp(0.5 * randn(shape[0], 1))
            value = randn(*shape) / math.sqrt(shape[1]) * layer_gain[layer] * row_scale
        param.copy_(value)


def build_tiny(key: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny model (float32, CPU, eval mode) and its tokenizer; the same weights every time."""
    spec = _spec(key)
    config = make_config(key)
    with torch.random.fork_rng(devices=[]):  # transformers' own init must not disturb the global RNG
        model = _CLASSES[spec.family](config)
    _seeded_init(model, spec.seed)
    model.eval()
    return model, make_tokenizer()
