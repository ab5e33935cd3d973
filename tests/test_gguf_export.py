"""`prune export --format gguf`: the GGUF llama.cpp runs, for uniform (llama) and per-layer (deci) widths.

Everywhere: the file's metadata and tensor shapes (read back with gguf.GGUFReader) match the pruned
model, and a NumPy re-implementation of llama.cpp's llama/deci graphs (interleaved RoPE, per-layer head
counts, head count 0 skips attention, FFN width 0 skips the rest of the layer) run on the file's
tensors gives our logits; refusals exit 2. Where `llama_cpp` is importable (a separate venv, see the
README): a pruned smollm2-135m with uneven layers, loaded by llama.cpp itself, gives our logits in f32
and f16 and generates the same tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from prune_core.adapters import get_adapter
from prune_core.export import load_pruned, save_pruned
from prune_core.gguf_export import _pre_tokenizer_name, llama3_rope_factors, permute_rope
from prune_core.surgery import apply_pruning
from prune_core.tiny import build_tiny

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def pruned_folder(folder: Path, model: torch.nn.Module, tok: object, prune: dict, *, compensate: bool = False,
                  scale: float = 1.0) -> Path:
    means = None
    if compensate:
        g = torch.Generator().manual_seed(7)
        cfg = model.config  # type: ignore[attr-defined]
        means = {"o_proj": scale * torch.randn(cfg.num_hidden_layers, cfg.num_attention_heads * cfg.head_dim,
                                               generator=g),
                 "down_proj": scale * torch.randn(cfg.num_hidden_layers, cfg.intermediate_size, generator=g)}
    report = apply_pruning(model, get_adapter(model), prune, input_means=means)
    return save_pruned(model, tok, folder, kept=report.kept, source={"spec": "test"}, session={})


def tiny_folder(folder: Path, prune: dict, *, compensate: bool = False) -> Path:
    model, tok = build_tiny("tiny-llama")
    return pruned_folder(folder, model, tok, prune, compensate=compensate)


# tiny-llama: 4 layers, 2 KV heads (2 query heads each), 128 MLP channels
UNIFORM = {i: {"attention": [i % 2], "mlp": list(range(i, 128, 4))} for i in range(4)}
# the pruned (not kept) indices per layer
UNEVEN = {0: {"attention": [0], "mlp": list(range(40))}, 1: {"mlp": list(range(40))}, 3: {"attention": [1]}}
# layer 0: attention removed (the file's first block must keep heads: a zero stand-in); layer 1: MLP
# removed (a zero FFN of width 1 keeps the attention); layer 2: both removed (the identity: left out)
REMOVED = {0: {"attention": [0, 1], "mlp": list(range(50))}, 1: {"mlp": list(range(128))},
           2: {"attention": [0, 1], "mlp": list(range(128))}, 3: {"attention": [0]}}
IDS = [5, 80, 97, 32, 200, 13, 101, 256, 40, 41, 7, 99]


# --------------------------------------------------------------------------------------------------
# reading a GGUF back, and llama.cpp's graph in NumPy


def fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    out: dict[str, object] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        values = [f.parts[i] for i in f.data]
        if (f.types and f.types[0] == gguf.GGUFValueType.STRING) or (
                len(f.types) > 1 and f.types[1] == gguf.GGUFValueType.STRING):
            decoded: list = [bytes(v).decode("utf-8") for v in values]
        else:
            decoded = [v.tolist()[0] for v in values]
        out[name] = decoded if f.types[0] == gguf.GGUFValueType.ARRAY else decoded[0]
    return out


def tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str, np.ndarray]]:
    """name → (GGUF dims, type name, float64 array in torch [out, in] order)."""
    reader = gguf.GGUFReader(str(path))
    return {t.name: (tuple(int(d) for d in t.shape), t.tensor_type.name, np.asarray(t.data, dtype=np.float64))
            for t in reader.tensors}


def per_layer(meta: dict, key: str, n: int) -> list[int]:
    value = meta[key]
    return list(value) if isinstance(value, list) else [int(value)] * n  # type: ignore[arg-type]


def rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope_interleaved(x: np.ndarray, base: float, factors: np.ndarray | None) -> np.ndarray:
    """GGML's normal RoPE: rotates the pairs (x[2i], x[2i+1]) of each head; x is [tokens, heads, dim]."""
    t, _, d = x.shape
    freqs = base ** (-np.arange(0, d, 2) / d)
    if factors is not None:
        freqs = freqs / factors
    angle = np.arange(t)[:, None, None] * freqs[None, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * np.cos(angle) - x1 * np.sin(angle)
    out[..., 1::2] = x0 * np.sin(angle) + x1 * np.cos(angle)
    return out


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    """What llama.cpp's `llama` / `deci` graphs compute from this file (float64 NumPy, no cache)."""
    meta, t = fields(path), tensors(path)
    arch = meta["general.architecture"]
    n = int(meta[f"{arch}.block_count"])  # type: ignore[arg-type]
    heads, kv, ff = (per_layer(meta, f"{arch}.{k}", n) for k in
                     ("attention.head_count", "attention.head_count_kv", "feed_forward_length"))
    hd = int(meta[f"{arch}.attention.key_length"])  # type: ignore[arg-type]
    eps = float(meta[f"{arch}.attention.layer_norm_rms_epsilon"])  # type: ignore[arg-type]
    base = float(meta[f"{arch}.rope.freq_base"])  # type: ignore[arg-type]
    factors = t["rope_freqs.weight"][2] if "rope_freqs.weight" in t else None

    def w(name: str) -> np.ndarray:
        return t[name][2]

    def lin(x: np.ndarray, name: str) -> np.ndarray:
        y = x @ w(f"{name}.weight").T
        return y + w(f"{name}.bias") if f"{name}.bias" in t else y

    x = w("token_embd.weight")[ids]
    tokens = len(ids)
    mask = np.triu(np.full((tokens, tokens), -np.inf), 1)
    for il in range(n):
        b = f"blk.{il}"
        inp = x
        cur = x
        if heads[il] > 0:
            h = rms(x, w(f"{b}.attn_norm.weight"), eps)
            q = rope_interleaved(lin(h, f"{b}.attn_q").reshape(tokens, heads[il], hd), base, factors)
            k = rope_interleaved(lin(h, f"{b}.attn_k").reshape(tokens, kv[il], hd), base, factors)
            v = lin(h, f"{b}.attn_v").reshape(tokens, kv[il], hd)
            group = heads[il] // kv[il]
            outs = []
            for head in range(heads[il]):
                s = q[:, head] @ k[:, head // group].T / np.sqrt(hd) + mask
                p = np.exp(s - s.max(-1, keepdims=True))
                outs.append((p / p.sum(-1, keepdims=True)) @ v[:, head // group])
            cur = lin(np.concatenate(outs, -1), f"{b}.attn_output")
        if ff[il] == 0:
            continue  # llama.cpp's deci graph: the layer's output is dropped, its input goes on
        ffn_inp = cur + inp if heads[il] > 0 else cur
        h = rms(ffn_inp, w(f"{b}.ffn_norm.weight"), eps)
        g = lin(h, f"{b}.ffn_gate")
        x = lin(g / (1 + np.exp(-g)) * lin(h, f"{b}.ffn_up"), f"{b}.ffn_down") + ffn_inp
    x = rms(x, w("output_norm.weight"), eps)
    head = w("output.weight") if "output.weight" in t else w("token_embd.weight")
    return x @ head.T


def our_logits(folder: Path, ids: list[int]) -> np.ndarray:
    model, _ = load_pruned(folder)
    with torch.no_grad():
        return model.float()(torch.tensor([ids])).logits[0].double().numpy()


def export(src: Path, out: Path, *extra: str) -> dict:
    code, stdout, err = invoke("export", str(src), "--format", "gguf", "--out", str(out), "--json", *extra)
    assert code == 0, err
    return json.loads(stdout)


# --------------------------------------------------------------------------------------------------
# everywhere


def test_permutation_turns_rotate_half_into_interleaved_pairs() -> None:
    w = torch.arange(2 * 8, dtype=torch.float32).reshape(8, 2)  # 2 heads of size 4: rows 0-3, 4-7
    assert permute_rope(w, 2)[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    assert permute_rope(torch.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_pre_tokenizer_names_are_the_ones_whose_regex_matches() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert _pre_tokenizer_name(byte_level, 100) == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert _pre_tokenizer_name({"type": "Sequence", "pretokenizers": [digits, byte_level]}, 100) == "smollm"
    no_regex = {**byte_level, "use_regex": False}
    assert _pre_tokenizer_name(no_regex, 0) == "gpt-2"  # no merges: the split cannot matter
    assert _pre_tokenizer_name(no_regex, 100) is None
    other = {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "..."},
                                                    "behavior": "Isolated", "invert": False}, no_regex]}
    assert _pre_tokenizer_name(other, 100) is None  # refused rather than tokenized differently
    # Meta-Llama-3-8B's pre-tokenizer, built with the tokenizers library and read back from its JSON
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    llama3 = json.loads(tok.to_str())["pre_tokenizer"]
    assert _pre_tokenizer_name(llama3, 100) == "llama-bpe"
    qwen2 = json.loads(json.dumps(llama3).replace("{1,3}", ""))  # one digit at a time: another tokenizer
    assert _pre_tokenizer_name(qwen2, 100) is None


def test_uniform_pruning_is_the_llama_architecture(tmp_path: Path) -> None:
    src = tiny_folder(tmp_path / "model", UNIFORM, compensate=True)
    out = tmp_path / "m.gguf"
    info = export(src, out)
    assert info["architecture"] == "llama" and info["block_count"] == 4 and info["dropped_layers"] == []
    meta, t = fields(out), tensors(out)
    assert meta["general.architecture"] == "llama"
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"],
            meta["llama.feed_forward_length"], meta["llama.attention.key_length"]) == (2, 1, 96, 16)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.bos_token_id"] == 256
    assert len(meta["tokenizer.ggml.tokens"]) == 259  # type: ignore[arg-type]
    _, tok = build_tiny("tiny-llama")
    vocab = tok.get_vocab()
    assert [vocab[s] for s in meta["tokenizer.ggml.tokens"]] == list(range(259))  # type: ignore[union-attr]
    assert t["blk.0.attn_q.weight"][:2] == ((64, 32), "F32")
    assert t["blk.0.attn_k.weight"][:2] == ((64, 16), "F32")
    assert t["blk.2.ffn_down.weight"][:2] == ((96, 64), "F32")
    assert {"blk.0.attn_output.bias", "blk.0.ffn_down.bias"} <= set(t)  # the compensation biases
    assert "output.weight" not in t  # tied: llama.cpp reuses token_embd
    ours = our_logits(src, IDS)
    assert np.abs(gguf_logits(out, IDS) - ours).max() < 1e-4 * np.abs(ours).max()


def test_uneven_widths_are_deci_arrays(tmp_path: Path) -> None:
    src = tiny_folder(tmp_path / "model", UNEVEN, compensate=True)
    out = tmp_path / "m.gguf"
    info = export(src, out)
    assert info["architecture"] == "deci"
    meta, t = fields(out), tensors(out)
    assert meta["deci.attention.head_count"] == [2, 4, 4, 2]
    assert meta["deci.attention.head_count_kv"] == [1, 2, 2, 1]
    assert meta["deci.feed_forward_length"] == [88, 88, 128, 128]
    assert t["blk.1.attn_k.weight"][0] == (64, 32) and t["blk.3.attn_k.weight"][0] == (64, 16)
    assert t["blk.0.ffn_up.weight"][0] == (64, 88) and t["blk.2.ffn_up.weight"][0] == (64, 128)
    model, _ = load_pruned(src)
    k = model.model.layers[3].self_attn.k_proj.weight.detach().double().numpy()
    assert np.array_equal(t["blk.3.attn_k.weight"][2], permute_rope(torch.from_numpy(k), 1).numpy())
    ours = our_logits(src, IDS)
    assert np.abs(gguf_logits(out, IDS) - ours).max() < 1e-4 * np.abs(ours).max()


@pytest.mark.parametrize("compensate", [False, True])
def test_removed_blocks_map_exactly(tmp_path: Path, compensate: bool) -> None:
    src = tiny_folder(tmp_path / "model", REMOVED, compensate=compensate)
    out = tmp_path / "m.gguf"
    info = export(src, out)
    meta, t = fields(out), tensors(out)
    if compensate:  # layer 2's removed blocks add constant biases: kept as zero stand-ins with biases
        assert info["dropped_layers"] == [] and meta["deci.block_count"] == 4
        assert meta["deci.attention.head_count"] == [2, 4, 2, 2]
        assert meta["deci.feed_forward_length"] == [78, 1, 1, 128]
        assert "blk.2.attn_output.bias" in t and "blk.2.ffn_down.bias" in t
    else:  # layer 2 is the identity and is left out; layer 0 keeps one zero head, layer 1 a zero FFN
        assert info["dropped_layers"] == [2] and meta["deci.block_count"] == 3
        assert meta["deci.attention.head_count"] == [2, 4, 2]
        assert meta["deci.attention.head_count_kv"] == [1, 2, 1]
        assert meta["deci.feed_forward_length"] == [78, 1, 128]
    assert not t["blk.0.attn_q.weight"][2].any() and not t["blk.1.ffn_down.weight"][2].any()
    ours = our_logits(src, IDS)
    assert np.abs(gguf_logits(out, IDS) - ours).max() < 1e-4 * np.abs(ours).max()


def test_removed_attention_after_the_first_block_has_no_heads(tmp_path: Path) -> None:
    src = tiny_folder(tmp_path / "model", {2: {"attention": [0, 1]}})
    out = tmp_path / "m.gguf"
    export(src, out)
    meta, t = fields(out), tensors(out)
    assert meta["deci.attention.head_count"] == [4, 4, 0, 4]
    assert meta["deci.attention.head_count_kv"] == [2, 2, 0, 2]
    assert not [n for n in t if n.startswith("blk.2.attn")]
    ours = our_logits(src, IDS)
    assert np.abs(gguf_logits(out, IDS) - ours).max() < 1e-4 * np.abs(ours).max()


def test_f16_keeps_vectors_in_f32(tmp_path: Path) -> None:
    src = tiny_folder(tmp_path / "model", UNEVEN, compensate=True)
    out = tmp_path / "m.gguf"
    info = export(src, out, "--dtype", "f16")
    assert info["dtype"] == "f16"
    meta, t = fields(out), tensors(out)
    assert meta["general.file_type"] == 1
    assert t["blk.0.attn_q.weight"][1] == "F16" and t["token_embd.weight"][1] == "F16"
    assert t["blk.0.attn_norm.weight"][1] == "F32" and t["blk.0.ffn_down.bias"][1] == "F32"
    ours = our_logits(src, IDS)
    assert np.abs(gguf_logits(out, IDS) - ours).max() < 1e-2 * np.abs(ours).max()


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128))
    factors = llama3_rope_factors(config)
    assert len(set(np.round(factors, 4).tolist())) > 2  # some frequencies kept, some scaled, some blended
    assert np.allclose(plain.numpy() / factors, scaled.double().numpy(), rtol=1e-5)


def test_refusals_exit_2_and_write_nothing(tmp_path: Path) -> None:
    src = tiny_folder(tmp_path / "model", UNIFORM)
    precious = tmp_path / "notes.gguf"
    precious.write_text("not a gguf")
    code, _, err = invoke("export", str(src), "--format", "gguf", "--out", str(precious))
    assert code == 2 and "is not a GGUF file" in err and precious.read_text() == "not a gguf"
    code, _, err = invoke("export", str(src), "--format", "gguf", "--out", str(tmp_path))
    assert code == 2 and "is a folder" in err
    code, _, err = invoke("export", str(src), "--format", "gguf", "--out", str(tmp_path / "a.gguf"), "--dtype", "q8")
    assert code == 2 and "--dtype f32 or --dtype f16" in err
    code, _, err = invoke("export", str(src), "--format", "gguf")
    assert code == 2 and "needs --out FILE.gguf" in err

    model, tok = build_tiny("tiny-qwen2")
    qwen = pruned_folder(tmp_path / "qwen", model, tok, UNIFORM)
    code, _, err = invoke("export", str(qwen), "--format", "gguf", "--out", str(tmp_path / "b.gguf"))
    assert code == 2 and "supports model type llama, not 'qwen2'" in " ".join(err.split())

    everything = tiny_folder(tmp_path / "empty", {i: {"attention": [0, 1], "mlp": list(range(128))}
                                                  for i in range(4)})
    code, _, err = invoke("export", str(everything), "--format", "gguf", "--out", str(tmp_path / "c.gguf"))
    assert code == 2 and "every block of the model is removed" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model", "notes.gguf", "qwen"]

    out = tmp_path / "ok.gguf"
    assert invoke("export", str(src), "--format", "gguf", "--out", str(out))[0] == 0
    assert invoke("export", str(src), "--format", "gguf", "--out", str(out), "--no-verify")[0] == 0  # replaced


# --------------------------------------------------------------------------------------------------
# llama.cpp itself (where llama_cpp is importable)


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "tolerance"), [("f32", 1e-4), ("f16", 2e-2)])
def test_llama_cpp_runs_a_pruned_smollm2(tmp_path_factory: pytest.TempPathFactory, dtype: str,
                                         tolerance: float) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from prune_core.models import resolve_model

    base = tmp_path_factory.getbasetemp() / "smollm2-uneven"  # shared by both dtypes
    if not (base / "pruning.json").is_file():
        loaded = resolve_model("smollm2-135m", device="cpu")
        # 30 layers, 3 KV heads (3 query heads each), 1536 channels: uneven KV heads (3, 2 or 1) and channels,
        # removed blocks (attention in layer 20, MLP in layer 24, both in layer 27) and small compensation biases
        prune = {i: {"attention": list(range(i % 4 if i % 4 < 3 else 0)), "mlp": list(range(0, 1536, 6 + i % 5))}
                 for i in range(30)}
        prune[20] = {"attention": [0, 1, 2]}
        prune[24] = {"mlp": list(range(1536))}
        prune[27] = {"attention": [0, 1, 2], "mlp": list(range(1536))}
        pruned_folder(base, loaded.model, loaded.tokenizer, prune, compensate=True, scale=0.02)
    out = tmp_path_factory.mktemp("gguf") / f"smollm2-uneven-{dtype}.gguf"
    info = export(base, out, "--dtype", dtype)
    assert info["architecture"] == "deci" and info["verified"]
    print(f"{dtype}: the export's own llama.cpp check (12 random ids, f32 KV cache): max |logit difference| "
          f"{info['max_abs_logit_diff']:.3g}")
    assert len(set(info["head_count_kv"])) > 1 and len(set(info["feed_forward_length"])) > 1

    model, tok = load_pruned(base)
    ids = tok("The capital of France is Paris. It is a beautiful city with").input_ids
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].double().numpy()
    f32 = llama_cpp.GGML_TYPE_F32
    for cache in ("f32", "f16"):  # f16: llama.cpp's default KV cache, which adds its own rounding
        kinds = {"type_k": f32, "type_v": f32} if cache == "f32" else {}
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, logits_all=True, verbose=False, seed=0, **kinds)
        assert llm.tokenize(b"The capital of France is Paris. It is a beautiful city with", add_bos=False) == ids
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float64)
        diff = float(np.abs(got - want).max())
        agree = float((got.argmax(-1) == want.argmax(-1)).mean())
        print(f"{dtype} weights, {cache} KV cache: max |logit difference| {diff:.3g} (largest |logit| "
              f"{np.abs(want).max():.3g}, {len(ids)} tokens), argmax agreement {agree:.3f}")
        assert diff < (tolerance if cache == "f32" else 2e-2) * np.abs(want).max()
        assert agree >= 0.9

    llm.reset()
    generated = [t for _, t in zip(range(6), llm.generate(ids, temp=0.0, top_k=1), strict=False)]
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist()
    print(f"{dtype}: llama.cpp generated {generated}, ours {ours}: {llm.detokenize(generated)!r}")
    assert len(generated) == 6
    if dtype == "f32":
        assert generated == ours
    llm.close()


@pytest.mark.parametrize("prune", [REMOVED, {2: {"attention": [0, 1]}}, UNIFORM], ids=["removed", "no-heads", "uniform"])
def test_llama_cpp_runs_tiny_shapes(tmp_path: Path, prune: dict) -> None:
    """The shapes smollm2 does not exercise: a left-out identity layer, head count 0, the llama architecture."""
    llama_cpp = pytest.importorskip("llama_cpp")
    src = tiny_folder(tmp_path / "model", prune)
    out = tmp_path / "m.gguf"
    info = export(src, out)
    assert info["verified"]
    ours = our_logits(src, IDS)
    for cache, tolerance in ((llama_cpp.GGML_TYPE_F32, 1e-5), (llama_cpp.GGML_TYPE_F16, 5e-3)):  # f16: the default
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, logits_all=True, verbose=False, seed=0,
                              type_k=cache, type_v=cache)
        llm.eval(IDS)
        got = np.array(llm.scores[: len(IDS)], dtype=np.float64)
        assert np.abs(got - ours).max() < tolerance * np.abs(ours).max()
        llm.close()
