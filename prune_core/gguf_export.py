"""Export a pruned Llama-family model as one GGUF file that llama.cpp runs (`prune export --format gguf`).

llama.cpp reads a model's shapes from GGUF metadata, so what a pruned model can become depends on
which of its architectures take per-layer values:

- `llama` (the model's own architecture) reads one head count, one KV-head count and one FFN width
  for all layers (it builds every layer's tensors from layer 0's values). A *uniformly* pruned model
  (every layer keeps the same KV heads and MLP channels, no block removed) is written as `llama`.
- `deci` (llama.cpp's architecture for NAS-pruned Llama-3.1-Nemotron) reads
  `deci.attention.head_count`, `deci.attention.head_count_kv` and `deci.feed_forward_length` as
  arrays with one value per layer, builds each layer's tensors from its own values, skips the
  attention of a layer whose head count is 0 (the residual passes through) and otherwise computes
  exactly the Llama block. Every other pruned model is written as `deci`.

Mapping details (all exact, checked against llama.cpp by tests/test_gguf_export.py):
- a layer whose attention *and* MLP are removed (and carry no compensation bias) is the identity and
  is left out of the file (block_count shrinks);
- a removed attention block is written as head count 0, except in the file's first layer (llama.cpp
  derives the head size from layer 0's head count) or when the removed block carries a constant
  compensation bias: then it is written as one KV head with all-zero Q/K/V/output weights plus that
  bias as `attn_output.bias` (zero values give a zero attention output, the bias is added after);
- a removed MLP block in a layer that keeps its attention is written as an FFN of width 1 with zero
  weights (plus its bias as `ffn_down.bias`), because llama.cpp's `deci` graph drops the attention
  output of a layer whose FFN width is 0;
- compensation biases (`o_proj` / `down_proj` biases added by reconstruction) are written as
  `attn_output.bias` / `ffn_down.bias`, which both graphs add; no `[pruning] compensate = "none"` needed;
- Q and K rows are permuted per head from Hugging Face's rotate-half order to the interleaved order
  llama.cpp's normal RoPE expects (this is what convert_hf_to_gguf does for Llama; per head, so it
  works for any number of kept heads).

Refused (exit 2, with the reason): model types other than llama (Mistral, Qwen2, … have different
llama.cpp graphs), RoPE scaling other than none / linear / llama3, activations other than SiLU,
tokenizers other than byte-level BPE (GPT-2 style regex or SmolLM's digit-split variant).

Tokenizer: the Hugging Face fast tokenizer becomes `tokenizer.ggml.model = "gpt2"` with its tokens
(padded to the embedding rows), token types (special added tokens are CONTROL), merges, the
pre-tokenizer name whose regex matches the tokenizer's, special token ids, add-BOS/EOS flags and the
chat template.

f32 writes every tensor as float32; f16 writes matrices as float16 and 1-D tensors (norms, biases,
RoPE factors) as float32, like llama.cpp's own converter. The file is written to a hidden temporary
file next to the target, read back with `gguf.GGUFReader` (every tensor's name, shape, type and
bytes must be what was planned) and, when `llama_cpp` is importable, loaded with llama.cpp and its
logits compared with ours, before it is renamed into place. An existing target is replaced only if
it is a GGUF file.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prune_core import atomic
from prune_core.errors import BadInput, RunFailed

Say = Callable[[str], None]
DTYPES = ("f32", "f16")
GGUF_MAGIC = b"GGUF"
SUPPORTED_MODEL_TYPES = ("llama",)
COMPARE_TOKENS = 12
# max |logit difference| / largest |logit| accepted by the llama.cpp check
TOLERANCE = {"f32": 1e-3, "f16": 2e-2}


@dataclass
class LayerPlan:
    """One GGUF block: which source layer it comes from and its llama.cpp sizes."""

    source: int
    n_head: int
    n_head_kv: int
    n_ff: int
    zero_attention: bool = False  # removed attention written as one all-zero KV head (+ bias)
    zero_mlp: bool = False  # removed MLP written as a zero FFN of width 1 (+ bias)


@dataclass
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    source: Path
    architecture: str
    dtype: str
    layers: list[LayerPlan]
    dropped_layers: list[int]
    tensors: int
    parameters: int
    max_abs_logit_diff: float | None = None  # from llama.cpp, None when not checked
    checks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "source": str(self.source), "format": "gguf",
                "architecture": self.architecture, "dtype": self.dtype, "block_count": len(self.layers),
                "dropped_layers": self.dropped_layers,
                "head_count": [p.n_head for p in self.layers],
                "head_count_kv": [p.n_head_kv for p in self.layers],
                "feed_forward_length": [p.n_ff for p in self.layers],
                "zero_stand_ins": sum(p.zero_attention + p.zero_mlp for p in self.layers),
                "tensors": self.tensors, "parameters": self.parameters, "checks": self.checks,
                "verified": self.max_abs_logit_diff is not None, "max_abs_logit_diff": self.max_abs_logit_diff}


# --------------------------------------------------------------------------------------------------
# shapes


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def plan_layers(recipe: dict[str, Any], config: Any) -> tuple[list[LayerPlan], list[int]]:
    """The GGUF blocks of a pruned model (see the module docstring) and the layers left out."""
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    if heads % kv_heads:
        raise BadInput(f"{heads} query heads do not split evenly over {kv_heads} KV heads",
                       "this model cannot be written for llama.cpp")
    group = heads // kv_heads
    plans: list[LayerPlan] = []
    dropped: list[int] = []
    for entry in recipe["layers"]:
        li = int(entry["layer"])
        att, mlp = entry["attention"], entry["mlp"]
        att_removed, mlp_removed = bool(att.get("removed")), bool(mlp.get("removed"))
        att_bias, mlp_bias = bool(att.get("output_bias")), bool(mlp.get("output_bias"))
        if att_removed and mlp_removed and not att_bias and not mlp_bias:
            dropped.append(li)  # the identity: nothing to run
            continue
        plan = LayerPlan(li, 0, 0, 0)
        if att_removed:
            plan.zero_attention = att_bias or not plans  # layer 0 must have heads: llama.cpp derives head size there
        else:
            plan.n_head_kv = len(att["kept"])
            plan.n_head = plan.n_head_kv * group
        if plan.zero_attention:
            plan.n_head_kv, plan.n_head = 1, group
        if mlp_removed:
            plan.zero_mlp = plan.n_head > 0 or mlp_bias
            plan.n_ff = 1 if plan.zero_mlp else 0
        else:
            plan.n_ff = len(mlp["kept"])
        plans.append(plan)
    if not plans:
        raise BadInput("every block of the model is removed", "prune less: the model computes nothing")
    return plans, dropped


def is_uniform(plans: list[LayerPlan], dropped: list[int]) -> bool:
    """Whether the plain `llama` architecture (one size for all layers) describes these blocks."""
    first = plans[0]
    return not dropped and all(
        (p.n_head, p.n_head_kv, p.n_ff) == (first.n_head, first.n_head_kv, first.n_ff)
        and not p.zero_attention and not p.zero_mlp and p.n_head > 0 and p.n_ff > 0 for p in plans)


# --------------------------------------------------------------------------------------------------
# model checks, RoPE, tokenizer


def _rope(config: Any) -> tuple[float, str, dict[str, Any]]:
    """(rope_theta, rope type, parameters) from a transformers 4.x or 5.x config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = str(params.get("rope_type") or params.get("type") or "default")
    return float(theta), kind, params


def check_model(config: Any) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BadInput(f"--format gguf supports model type llama, not {model_type!r} (llama.cpp runs other "
                       "families with other graphs this exporter does not write)",
                       "use --format hf for a uniformly pruned model and convert it with llama.cpp's "
                       "convert_hf_to_gguf.py, or load the pruned folder with prune_core.export.load_pruned")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise BadInput(f"the model's activation is {act!r}; llama.cpp's llama graph uses SiLU",
                       "this model cannot be written for llama.cpp")
    _theta, kind, _params = _rope(config)
    if kind not in ("default", "linear", "llama3"):
        raise BadInput(f"RoPE scaling {kind!r} is not supported by --format gguf (only none, linear, llama3)",
                       "use --format hf for a uniformly pruned model and convert it with llama.cpp's "
                       "convert_hf_to_gguf.py")


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's RoPE scaling (llama.cpp's `rope_freqs.weight`)."""
    theta, _kind, p = _rope(config)
    dim = _head_dim(config)
    factor = float(p.get("factor", 8.0))
    low, high = float(p.get("low_freq_factor", 1.0)), float(p.get("high_freq_factor", 4.0))
    old_context = float(p.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * theta ** (i / dim)
        if wavelength < old_context / high:
            out.append(1.0)
        elif wavelength > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


# Llama 3's split (its tokenizer.json: a Split of this regex, Isolated, then a ByteLevel without its own
# regex); llama.cpp's "llama-bpe" pre-tokenizer splits with the same expression.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer_name(pre: dict[str, Any] | None, merges: int) -> str | None:
    """llama.cpp's pre-tokenizer name whose split regex equals this byte-level tokenizer's."""
    def byte_level(p: dict[str, Any]) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) and not p.get("add_prefix_space")

    if pre is None:
        return None
    if byte_level(pre):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits")
                and byte_level(parts[1])):
            return "smollm"  # each digit split off, then GPT-2's regex
        if (len(parts) == 2 and parts[0].get("type") == "Split"
                and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
                and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
                and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)
                and not parts[1].get("add_prefix_space")):
            return "llama-bpe"  # Llama 3 / 3.1 / 3.2
    if merges == 0 and pre.get("type") == "ByteLevel":
        return "gpt-2"  # no merges: every byte is its own token however the text is split
    return None


def tokenizer_metadata(tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """The `tokenizer.ggml.*` values of a byte-level BPE fast tokenizer (refuses any other)."""
    import json

    fix = ("--format gguf writes byte-level BPE tokenizers with GPT-2's, SmolLM's or Llama 3's split (e.g. SmolLM2, "
           "Llama 3); for others (Llama 2 and Mistral's SentencePiece) convert a --format hf export with llama.cpp's "
           "convert_hf_to_gguf.py (uniform widths only)")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BadInput("the pruned model has no fast (tokenizer.json) tokenizer", fix)
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel" or spec.get("normalizer"):
        raise BadInput(f"the tokenizer is {model.get('type')} with decoder {(spec.get('decoder') or {}).get('type')}, "
                       "not a byte-level BPE", fix)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer"), len(merges))
    if pre is None:
        raise BadInput(f"the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))} has no llama.cpp "
                       "equivalent this exporter knows", fix)
    vocab = backend.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= n_vocab:
        raise BadInput(f"the tokenizer has ids up to {max(vocab.values())} but the embedding only {n_vocab} rows",
                       "this model cannot be written for llama.cpp")
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    by_id = {i: tok for tok, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(by_id[i])
            types.append(3 if added[i].get("special") else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
    ids = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    template = getattr(tokenizer, "chat_template", None)
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges,
            "bos": bos, "eos": eos, "unk": tokenizer.unk_token_id, "pad": tokenizer.pad_token_id,
            "add_bos": bool(ids) and bos is not None and ids[0] == bos,
            "add_eos": bool(ids) and eos is not None and ids[-1] == eos and len(ids) > 1,
            "chat_template": template if isinstance(template, str) else None}


# --------------------------------------------------------------------------------------------------
# tensors


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (x0..x(d/2-1), y0..) to interleaved pairs (x0, y0, …)."""
    rows = w.shape[0]
    head = rows // n_heads
    return w.reshape(n_heads, 2, head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def plan_tensors(state: dict[str, torch.Tensor], config: Any, plans: list[LayerPlan]) -> dict[str, torch.Tensor]:
    """GGUF tensor name → tensor (torch layout [out, in]; GGUF stores the reverse dims of the same bytes)."""
    hidden = int(config.hidden_size)
    hd = _head_dim(config)
    out: dict[str, torch.Tensor] = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for j, p in enumerate(plans):
        src, dst = f"model.layers.{p.source}", f"blk.{j}"
        if p.n_head > 0:
            out[f"{dst}.attn_norm.weight"] = state[f"{src}.input_layernorm.weight"]
        if p.zero_attention:
            z = torch.zeros
            out[f"{dst}.attn_q.weight"] = z(p.n_head * hd, hidden)
            out[f"{dst}.attn_k.weight"] = z(hd, hidden)
            out[f"{dst}.attn_v.weight"] = z(hd, hidden)
            out[f"{dst}.attn_output.weight"] = z(hidden, p.n_head * hd)
            if f"{src}.self_attn.bias" in state:
                out[f"{dst}.attn_output.bias"] = state[f"{src}.self_attn.bias"]
        elif p.n_head > 0:
            a = f"{src}.self_attn"
            out[f"{dst}.attn_q.weight"] = permute_rope(state[f"{a}.q_proj.weight"], p.n_head)
            out[f"{dst}.attn_k.weight"] = permute_rope(state[f"{a}.k_proj.weight"], p.n_head_kv)
            out[f"{dst}.attn_v.weight"] = state[f"{a}.v_proj.weight"]
            out[f"{dst}.attn_output.weight"] = state[f"{a}.o_proj.weight"]
            for proj, name, heads in (("q_proj", "attn_q", p.n_head), ("k_proj", "attn_k", p.n_head_kv),
                                      ("v_proj", "attn_v", 0), ("o_proj", "attn_output", 0)):
                bias = state.get(f"{a}.{proj}.bias")
                if bias is not None:
                    out[f"{dst}.{name}.bias"] = permute_rope(bias, heads) if heads else bias
        if p.n_ff > 0:
            out[f"{dst}.ffn_norm.weight"] = state[f"{src}.post_attention_layernorm.weight"]
        if p.zero_mlp:
            out[f"{dst}.ffn_gate.weight"] = torch.zeros(1, hidden)
            out[f"{dst}.ffn_up.weight"] = torch.zeros(1, hidden)
            out[f"{dst}.ffn_down.weight"] = torch.zeros(hidden, 1)
            if f"{src}.mlp.bias" in state:
                out[f"{dst}.ffn_down.bias"] = state[f"{src}.mlp.bias"]
        elif p.n_ff > 0:
            m = f"{src}.mlp"
            for proj, name in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
                out[f"{dst}.{name}.weight"] = state[f"{m}.{proj}.weight"]
                bias = state.get(f"{m}.{proj}.bias")
                if bias is not None:
                    out[f"{dst}.{name}.bias"] = bias
    out["output_norm.weight"] = state["model.norm.weight"]
    head = state.get("lm_head.weight")
    tied = head is None or bool(getattr(config, "tie_word_embeddings", False)) or \
        head.data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    if not tied:
        out["output.weight"] = head
    if _rope(config)[1] == "llama3":
        out["rope_freqs.weight"] = torch.from_numpy(llama3_rope_factors(config))
    return out


def _array(t: torch.Tensor, dtype: str) -> np.ndarray:
    a = t.detach().to("cpu", torch.float32).numpy()
    return a.astype(np.float16) if dtype == "f16" and a.ndim >= 2 else np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------------
# writing and checking


def _check_target(out: Path) -> None:
    if out.is_dir():
        raise BadInput(f"--out {out} is a folder", "name the .gguf file to write, e.g. --out exported/model.gguf")
    if out.exists():
        with open(out, "rb") as fh:
            if fh.read(4) != GGUF_MAGIC:
                raise BadInput(f"{out} exists and is not a GGUF file", "choose a new --out file (an existing one is "
                               "replaced only if it is a GGUF file)")


def write_gguf(path: Path, arch: str, config: Any, plans: list[LayerPlan], tensors: dict[str, np.ndarray],
               tok: dict[str, Any], *, name: str, dtype: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    hd = _head_dim(config)
    uniform = arch == "llama"
    w.add_block_count(len(plans))
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_feed_forward_length(plans[0].n_ff if uniform else [p.n_ff for p in plans])
    w.add_head_count(plans[0].n_head if uniform else [p.n_head for p in plans])
    w.add_head_count_kv(plans[0].n_head_kv if uniform else [p.n_head_kv for p in plans])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(len(tok["tokens"]))
    theta, kind, params = _rope(config)
    w.add_rope_freq_base(theta)
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    # llama.cpp requires the key and gguf-py refuses an empty array: a tokenizer without merges gets one
    # empty entry, the pair ("", ""), which never matches two real symbols
    w.add_token_merges(tok["merges"] or [""])
    for key, adder in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                       ("pad", w.add_pad_token_id)):
        if tok[key] is not None:
            adder(int(tok[key]))
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])
    for tname, array in tensors.items():
        w.add_tensor(tname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def check_file(path: Path, arch: str, plans: list[LayerPlan], tensors: dict[str, np.ndarray]) -> None:
    """Read the file back: the planned tensors, bytes and per-layer sizes, nothing else."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    got = {t.name: t for t in reader.tensors}
    problems = []
    if set(got) != set(tensors):
        problems.append(f"tensors differ: missing {sorted(set(tensors) - set(got))[:3]}, "
                        f"extra {sorted(set(got) - set(tensors))[:3]}")
    for tname, want in tensors.items():
        t = got.get(tname)
        if t is not None and (tuple(int(d) for d in t.shape) != tuple(reversed(want.shape))
                              or np.asarray(t.data).tobytes() != want.tobytes()):
            problems.append(f"{tname} was not written as planned")
    field_ = reader.get_field(f"{arch}.feed_forward_length")
    ff = [int(field_.parts[i][0]) for i in field_.data] if field_ is not None else []
    want_ff = [plans[0].n_ff] if arch == "llama" else [p.n_ff for p in plans]
    if ff != want_ff:
        problems.append(f"{arch}.feed_forward_length reads {ff}, not {want_ff}")
    if problems:
        raise RunFailed(f"the written GGUF does not read back as planned: {'; '.join(problems[:4])}",
                        "please report this with the pruned folder's pruning.json")


def llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` (float32, [len(ids), vocab]).

    The KV cache is float32 here: llama.cpp's default f16 cache alone moves logits by ~1e-3 of the
    largest one, which would hide what this compares, the file."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False,
                          n_threads=2, seed=0, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        with contextlib.suppress(Exception):
            llm.close()


def compare_with_llama_cpp(path: Path, model: torch.nn.Module, dtype: str, vocab: int) -> float:
    """Max |logit difference| between llama.cpp on the file and our model (changed in place: float32, and for
    f16 its matrices rounded to float16 as in the file, so the check measures the file, not the rounding)."""
    ids = torch.randint(0, vocab, (COMPARE_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    got = llama_cpp_logits(path, ids)
    model = model.float()
    with torch.no_grad():
        if dtype == "f16":
            for param in model.parameters():
                if param.ndim >= 2:
                    param.copy_(param.half().float())
        want = model(torch.tensor([ids])).logits[0].numpy()
    diff = float(np.abs(want - got).max())
    scale = float(np.abs(want).max()) or 1.0
    if not diff <= TOLERANCE[dtype] * scale:
        raise RunFailed(f"llama.cpp's logits differ from the pruned model's (max |difference| {diff:.3g}, largest "
                        f"logit {scale:.3g}); nothing was written",
                        "please report this with the pruned folder's config.json and pruning.json")
    return diff


def _llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def export_gguf(source: Path, out: Path, *, dtype: str = "f32", verify: bool = True,
                say: Say | None = None) -> GGUFExport:
    """Write the GGUF file of a pruned Llama model (see the module docstring)."""
    from prune_core.export import load_pruned, read_recipe
    from prune_core.hf_export import model_folder

    say = say or (lambda _msg: None)
    dtype = dtype.strip().lower()
    if dtype not in DTYPES:
        raise BadInput(f"unknown --dtype {dtype!r} for --format gguf", "use --dtype f32 or --dtype f16")
    model_dir = model_folder(Path(source))
    recipe = read_recipe(model_dir)
    out = Path(out)
    if model_dir.resolve() in out.resolve().parents:
        raise BadInput(f"--out {out} is inside the pruned model folder", "choose a file outside it")
    _check_target(out)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    check_model(config)
    plans, dropped = plan_layers(recipe, config)
    arch = "llama" if is_uniform(plans, dropped) else "deci"
    say(f"loading the pruned model from {model_dir}")
    model, tokenizer = load_pruned(model_dir, device="cpu")
    if tokenizer is None:
        raise BadInput(f"{model_dir} holds no tokenizer", "llama.cpp needs one: save the model with its tokenizer")
    state = model.state_dict()
    n_vocab = int(state["model.embed_tokens.weight"].shape[0])
    tok = tokenizer_metadata(tokenizer, n_vocab)
    tensors = {k: _array(v, dtype) for k, v in plan_tensors(state, config, plans).items()}

    checks: list[str] = []
    max_diff = None
    with atomic.atomic_path(out) as tmp:  # renamed into place only after every check below passed
        say(f"writing {arch} GGUF ({dtype}, {len(plans)} blocks) to {out}")
        write_gguf(tmp, arch, config, plans, tensors, tok, name=model_dir.parent.name if model_dir.name == "model"
                   else model_dir.name, dtype=dtype)
        check_file(tmp, arch, plans, tensors)
        checks.append("read back with gguf.GGUFReader: tensors, shapes, bytes and per-layer sizes as planned")
        if verify and _llama_cpp_available():
            say("checking: loading it with llama.cpp (llama_cpp) and comparing logits")
            max_diff = compare_with_llama_cpp(tmp, model, dtype, n_vocab)
            checks.append("loaded with llama.cpp (llama_cpp): its logits match the pruned model's")
        elif verify:
            checks.append("not run in llama.cpp: llama_cpp is not importable here (see the README for the check)")
    parameters = sum(int(a.size) for a in tensors.values())
    return GGUFExport(out, model_dir, arch, dtype, plans, dropped, len(tensors), parameters, max_diff, checks)
