"""Built-in random tiny models (`tiny-llama`, `tiny-mistral`, `tiny-qwen2`) and their byte tokenizer.

Tests and demos need real LLaMA-family modules without a download: these are genuine
`LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM` instances, 4 layers, hidden 64,
4 query heads over 2 KV heads (GQA), MLP width 128, small enough for hundreds of forward/backward
passes in a test run. Weights come from a seeded `torch.Generator` filled in sorted parameter order,
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
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

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
    if spec.family == "llama":
        config: PretrainedConfig = LlamaConfig(**common)
    elif spec.family == "mistral":
        config = MistralConfig(sliding_window=None, **common)
    else:
        config = Qwen2Config(use_sliding_window=False, **common)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
}


def parameter_count(key: str) -> int:
    """Number of (unique) parameters of a tiny model, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = _CLASSES[_spec(key).family](make_config(key))
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def _seeded_init(model: PreTrainedModel, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in sorted-name order (machine independent)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    layer_gain = torch.exp(0.4 * randn(LAYERS))  # some layers matter more than others
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        shape = tuple(param.shape)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * randn(*shape)
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
