"""Export: save_pruned / load_pruned round-trip logits exactly (compensated, tied, bf16), atomic folders."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prune_core.adapters import get_adapter
from prune_core.errors import BadInput
from prune_core.export import load_pruned, read_recipe, save_pruned
from prune_core.surgery import ZeroAttention, ZeroMLP, apply_pruning, count_parameters


def tiny(family: str, *, tie: bool = False, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    torch.manual_seed(seed)
    if dtype is not None:  # like from_pretrained(dtype=...): rotary buffers stay float32
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(tiny(family, tie=tie, seed=seed).config, dtype=dtype).eval()
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie, initializer_range=0.2)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=6)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


def word_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {f"w{i}": i for i in range(63)} | {"<unk>": 63}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


PRUNE = {0: {"attention": [0, 1], "mlp": [1, 2, 3]}, 1: {"attention": [1], "mlp": list(range(48))},
         2: {"mlp": list(range(0, 48, 2))}}


def pruned(family: str, *, tie: bool = False, compensate: bool = True, dtype: torch.dtype | None = None):
    model = tiny(family, tie=tie, dtype=dtype)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(5)
    means = {"o_proj": torch.randn(3, 32, generator=g), "down_proj": torch.randn(3, 48, generator=g)}
    report = apply_pruning(model, adapter, PRUNE, input_means=means if compensate else None)
    return model, report


@pytest.mark.parametrize(("family", "tie"), [("llama", False), ("qwen2", True), ("mistral", False)])
def test_round_trip_logits_exact(tmp_path, family: str, tie: bool) -> None:
    model, report = pruned(family, tie=tie)
    tok = word_tokenizer()
    session = {"pruning": {"ratio": 0.3}}
    folder = save_pruned(model, tok, tmp_path / "model", kept=report.kept,
                         source={"spec": f"tiny-{family}", "fingerprint": "abc"}, session=session)
    names = sorted(p.name for p in folder.iterdir())
    assert {"model.safetensors", "config.json", "pruning.json", "tokenizer.json"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".tmp"))]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]

    loaded, tok2 = load_pruned(folder)
    assert count_parameters(loaded) == count_parameters(model)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert tok2 is not None
    if family == "llama":
        assert tok2("w1 w7 w3").input_ids == tok("w1 w7 w3").input_ids
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()

    recipe = read_recipe(folder)
    assert recipe["removed_attention_blocks"] == [0] and recipe["removed_mlp_blocks"] == [1]
    assert recipe["compensation_biases"] == report.compensated
    assert recipe["layers"][2]["mlp"]["kept"] == list(range(1, 48, 2))
    assert recipe["layers"][1]["attention"]["kept"] == [0]
    assert recipe["session"] == session and recipe["source"]["spec"] == f"tiny-{family}"
    assert recipe["parameters"] == count_parameters(model)
    layers = loaded.model.layers
    assert isinstance(layers[0].self_attn, ZeroAttention) and layers[0].self_attn.bias is not None
    assert isinstance(layers[1].mlp, ZeroMLP)
    assert layers[2].mlp.down_proj.bias is not None


def test_round_trip_uncompensated_bf16_and_dtype_override(tmp_path) -> None:
    model, report = pruned("llama", compensate=False, dtype=torch.bfloat16)
    folder = save_pruned(model, None, tmp_path / "m", kept=report.kept, source={}, session={})
    loaded, tok = load_pruned(folder)
    assert tok is None
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded.model.layers[0].self_attn.bias is None and loaded.model.layers[1].mlp.bias is None
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    as_f32, _ = load_pruned(folder, dtype="float32")
    assert next(as_f32.parameters()).dtype == torch.float32
    assert read_recipe(folder)["compensation_biases"] == []


def test_unpruned_model_round_trips(tmp_path) -> None:
    model = tiny("qwen2", tie=True)
    kept = {i: {"attention": [0, 1], "mlp": list(range(48))} for i in range(3)}
    folder = save_pruned(model, None, tmp_path / "m", kept=kept, source={}, session={})
    loaded, _ = load_pruned(folder)
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_overwrite_refusal_and_failure_leaves_nothing(tmp_path) -> None:
    model, report = pruned("llama")
    folder = save_pruned(model, None, tmp_path / "m", kept=report.kept, source={"v": 1}, session={})
    # overwriting a previous export is fine
    save_pruned(model, None, folder, kept=report.kept, source={"v": 2}, session={})
    assert read_recipe(folder)["source"] == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # an unrelated non-empty folder is never replaced
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(BadInput):
        save_pruned(model, None, other, kept=report.kept, source={}, session={})
    assert (other / "notes.txt").read_text() == "keep me"

    class Broken:
        def save_pretrained(self, path: str) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_pruned(model, Broken(), tmp_path / "new", kept=report.kept, source={}, session={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "precious"]
    with pytest.raises(OSError):
        save_pruned(model, Broken(), folder, kept=report.kept, source={"v": 3}, session={})
    assert read_recipe(folder)["source"] == {"v": 2}  # the previous export is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "precious"]


def test_bad_inputs(tmp_path) -> None:
    model, report = pruned("llama")
    with pytest.raises(BadInput):
        load_pruned(tmp_path)
    bad = {k: dict(v) for k, v in report.kept.items()}
    bad[2] = {"attention": [0, 1], "mlp": [0, 1]}
    with pytest.raises(BadInput):
        save_pruned(model, None, tmp_path / "x", kept=bad, source={}, session={})
    folder = save_pruned(model, None, tmp_path / "y", kept=report.kept, source={}, session={})
    recipe = json.loads((folder / "pruning.json").read_text())
    recipe["format"] = "something-else"
    (folder / "pruning.json").write_text(json.dumps(recipe))
    with pytest.raises(BadInput):
        load_pruned(folder)
