"""Conformance: every adapter's tiny model passes the same checks.

One parametrized module run against the built-in tiny model of every supported family (llama,
mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, smollm3), float64:
- importance: every registered method equals the brute-force reference of tests/test_importance.py
  (its own backward passes and hand-written group slicing). Phi-3's fused projections are checked
  against the reference computed on its unfused twin (a Llama with the same weights split, whose
  logits are asserted equal first);
- parameter accounting: every linear of a decoder layer is declared, the declared slices partition
  each sliced axis, Σ groups × group cost equals the declared modules' parameters, and everything
  else in a layer (norms, Qwen3 / Gemma 3 per-head q/k norms) has a size pruning never changes;
- surgery: uneven attention groups and MLP channels per layer (one attention and one MLP block
  removed entirely) give exactly the logits and greedy generation of the masked original
  (prune_core.proxy.masked), with the exact parameter drop;
- export: save_pruned / load_pruned give identical logits, and generate() works on the loaded model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prune_core.adapters import SUPPORTED, get_adapter
from prune_core.export import load_pruned, read_recipe, save_pruned
from prune_core.importance import run_importance
from prune_core.importance.registry import get_method, method_keys
from prune_core.proxy import masked
from prune_core.surgery import ZeroAttention, ZeroMLP, apply_pruning, count_parameters
from prune_core.tiny import TINY_MODELS, build_tiny, make_tokenizer
from tests.test_importance import brute_force, expected_scores, group_pieces, scored_params

KEYS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3",
        "tiny-smollm3")
N, S, BS = 5, 20, 2  # 3 batches (2 + 2 + 1 rows); 20 tokens exceed the Gemma sliding window (16)
TOKENS = torch.randint(0, 256, (N, S), generator=torch.Generator().manual_seed(11))
PROMPT, NEW_TOKENS = TOKENS[:1, :18], 6
# uneven per layer: layer 1 loses its whole attention, layer 2 its whole MLP
PLAN: dict[int, dict[str, list[int]]] = {
    0: {"attention": [1], "mlp": list(range(0, 128, 3))},
    1: {"attention": [0, 1], "mlp": [5, 77]},
    2: {"mlp": list(range(128))},
    3: {"attention": [0], "mlp": list(range(64, 128))},
}
# the (aggregation, fisher_scale) cases of each method; every registered method must have a reference here
CASES: dict[str, tuple[tuple[str, str], ...]] = {
    "taylor": (("element", "tokens"), ("vector", "tokens")),
    "taylor_2nd": (("element", "tokens"), ("vector", "none")),
    "wanda": (("element", "tokens"),),
    "magnitude": (("element", "tokens"),),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and far faster than with threads on busy shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def greedy(model: nn.Module) -> torch.Tensor:
    """PROMPT + NEW_TOKENS greedy tokens (no early stop: the steps run past the sliding window)."""
    return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def _model(key: str) -> nn.Module:
    model, _ = build_tiny(key)
    return model.double()


def unfused_twin(model: nn.Module) -> nn.Module:
    """A Llama with the weights of a Phi-3 split into q/k/v_proj and gate/up_proj: the same function
    (asserted by its users), with the separate projections the brute-force reference slices."""
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    twin_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=d, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters=dict(cfg.rope_parameters), hidden_act=cfg.hidden_act,
        tie_word_embeddings=False, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    twin_cfg._attn_implementation = model.config._attn_implementation  # eager softmaxes in float32: match it
    twin = LlamaForCausalLM(twin_cfg).double().eval()
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if "qkv_proj" in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.split([q, kv, kv]), strict=True):
                state[key.replace("qkv_proj", name)] = part
        elif "gate_up_proj" in key:
            for name, part in zip(("gate_proj", "up_proj"), value.chunk(2), strict=True):
                state[key.replace("gate_up_proj", name)] = part
        else:
            state[key] = value
    twin.load_state_dict(state, strict=True)
    return twin


def reference_model(model: nn.Module) -> nn.Module:
    """The model the brute-force reference runs on: the model itself, or Phi-3's unfused twin."""
    if model.config.model_type != "phi3":
        return model
    twin = unfused_twin(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(TOKENS).logits, model(TOKENS).logits, rtol=1e-10, atol=1e-10)
    return twin


_REFERENCES: dict[str, tuple[nn.Module, nn.Module, dict[str, Any]]] = {}


def reference(key: str) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """(model, reference model, brute-force reference), computed once per family."""
    if key not in _REFERENCES:
        model = _model(key)
        ref_model = reference_model(model)
        _REFERENCES[key] = (model, ref_model, brute_force(ref_model, TOKENS, BS))
    return _REFERENCES[key]


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """sqrt(Σ w²) over every parameter of each group (weights and q/k/v/gate/up biases)."""
    values = {k: p.detach() for k, p in scored_params(model).items()}
    cfg = model.config
    out = {}
    for block, groups in (("attention", cfg.num_key_value_heads), ("mlp", cfg.intermediate_size)):
        table = torch.zeros(cfg.num_hidden_layers, groups, dtype=torch.float64)
        for layer in range(cfg.num_hidden_layers):
            for g in range(groups):
                table[layer, g] = sum((p**2).sum() for p in group_pieces(model, values, layer, block, g)).sqrt()
        out[block] = table
    return out


def test_every_supported_family_has_a_conformance_model() -> None:
    assert sorted(TINY_MODELS[k].family for k in KEYS) == sorted(SUPPORTED)
    for key in KEYS:
        model, _ = build_tiny(key)
        assert model.config.model_type == TINY_MODELS[key].family
        assert get_adapter(model).model_types[0] == model.config.model_type


def test_every_registered_method_has_a_reference() -> None:
    assert set(method_keys()) <= set(CASES), "add a brute-force reference for the new method to CASES"


@pytest.mark.parametrize("method", method_keys())
@pytest.mark.parametrize("key", KEYS)
def test_importance_matches_brute_force(key: str, method: str) -> None:
    model, ref_model, ref = reference(key)
    adapter = get_adapter(model)
    assert ref["batches"] == 3
    for aggregation, fisher_scale in CASES[method]:
        assert aggregation in get_method(method).aggregations
        result = run_importance(model, adapter, TOKENS, method=method, aggregation=aggregation,
                                fisher_scale=fisher_scale, batch_size=BS)
        label = f"{key} {method}/{aggregation}/{fisher_scale}"
        if method == "magnitude":
            want = magnitude_scores(ref_model)
            rtol, atol = 1e-12, 0.0
        else:
            want = expected_scores(ref_model, ref, method, aggregation, fisher_scale)
            rtol, atol = 1e-9, 1e-12
        assert result.attention.shape == (4, 2) and result.mlp.shape == (4, 128), label
        torch.testing.assert_close(result.attention, want["attention"], rtol=rtol, atol=atol, msg=label)
        torch.testing.assert_close(result.mlp, want["mlp"], rtol=rtol, atol=atol, msg=label)
        if method == "taylor_2nd":
            first = expected_scores(ref_model, ref, "taylor", aggregation, fisher_scale)
            assert result.first_order is not None
            for block in ("attention", "mlp"):
                torch.testing.assert_close(result.first_order[block], first[block], rtol=1e-9, atol=1e-12, msg=label)
        if method != "magnitude":  # bias compensation's input sums: every data pass, all tokens
            assert result.input_tokens == N * S and result.batches == 3
            for name in ("o_proj", "down_proj"):
                want_sums = torch.stack([ref["input_sum"][(layer, name)] for layer in range(4)])
                torch.testing.assert_close(result.input_sums[name], want_sums, rtol=1e-10, atol=1e-10, msg=label)


@pytest.mark.parametrize("key", KEYS)
def test_parameter_accounting_is_exact(key: str) -> None:
    model = _model(key)
    adapter = get_adapter(model)
    cfg = model.config
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    total = declared_total = ungrouped = 0
    for li, layer in enumerate(adapter.layers(model)):
        parts = adapter.parts(model, li)
        layout = parts.layout
        assert layout.attention.groups == cfg.num_key_value_heads and layout.mlp.groups == cfg.intermediate_size
        assert layout.attention.head_dim == parts.head_dim == d
        assert layout.attention.heads_per_group == cfg.num_attention_heads // cfg.num_key_value_heads
        # every linear of the layer is declared: nothing prunable is silently left out
        linears = {name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
        declared = {path for gl in layout.blocks for path in gl.modules()}
        assert declared == linears, key
        owned: set[str] = set()
        for gl in layout.blocks:
            block_params = 0
            for path in gl.modules():
                lin = parts.linear(path)
                for axis, size in ((0, lin.out_features), (1, lin.in_features)):
                    on_axis = [s for s in gl.slices_of(path) if s.axis == axis]
                    if not on_axis:
                        continue
                    # the groups' slices partition the axis: each index owned by exactly one group
                    indices = sorted(i for s in on_axis for i in s.indices(range(gl.groups)))
                    assert indices == list(range(size)), (key, li, path, axis)
                row_sliced = any(s.axis == 0 for s in gl.slices_of(path))
                block_params += lin.weight.numel() + (lin.bias.numel() if row_sliced and lin.bias is not None else 0)
                owned.add(f"{path}.weight")
                if row_sliced and lin.bias is not None:
                    owned.add(f"{path}.bias")
            assert gl.groups * parts.group_cost(gl.block) == block_params, (key, li, gl.block)
            declared_total += block_params
        total += parts.prunable_parameters()
        # what no group owns has a size pruning never changes: hidden-size norms and output biases,
        # and Qwen3 / Gemma 3's per-head q/k norms (one [head_dim] weight shared by every head)
        for name, p in layer.named_parameters():
            if name not in owned:
                assert p.dim() == 1 and p.numel() in (cfg.hidden_size, d), (key, name, tuple(p.shape))
                ungrouped += p.numel()
    assert adapter.prunable_parameters(model) == total == declared_total
    # the rest of the model: embeddings (tied or not), the final norm, the LM head
    outside = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(f"{adapter.layers_path}."))
    assert count_parameters(model) == total + ungrouped + outside
    describe = adapter.describe(model)
    assert (describe["heads"], describe["kv_heads"], describe["head_dim"]) == (4, 2, d)
    assert describe["prunable_parameters"] == total


_PRUNED: dict[str, tuple[nn.Module, Any, dict[str, torch.Tensor], dict[str, int]]] = {}


def pruned(key: str) -> tuple[nn.Module, Any, dict[str, torch.Tensor], dict[str, int]]:
    """(pruned model, surgery report, masked original's outputs, original costs), once per family."""
    if key not in _PRUNED:
        model = _model(key)
        adapter = get_adapter(model)
        costs = {"attention": adapter.attention_group_cost(model, 0), "mlp": adapter.mlp_group_cost(model, 0),
                 "prunable": adapter.prunable_parameters(model),
                 # per-head norms of layer 1's attention: no group owns them, they leave with the block
                 "head_norms": sum(p.numel() for n, p in model.model.layers[1].self_attn.named_parameters()
                                   if "norm" in n)}
        with torch.no_grad(), masked(model, adapter, PLAN):
            want = {"logits": model(TOKENS).logits,
                    "generated": greedy(model)}
        report = apply_pruning(model, adapter, PLAN)
        _PRUNED[key] = (model, report, want, costs)
    return _PRUNED[key]


@pytest.mark.parametrize("key", KEYS)
def test_surgery_equals_the_masked_original(key: str) -> None:
    model, report, want, costs = pruned(key)
    adapter = get_adapter(model)
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, want["logits"], rtol=1e-10, atol=1e-10)
        generated = greedy(model)
    assert torch.equal(generated, want["generated"])  # the KV cache works with uneven and removed blocks
    assert report.kept == {li: {"attention": [g for g in range(2) if g not in PLAN[li].get("attention", [])],
                                "mlp": [j for j in range(128) if j not in PLAN[li].get("mlp", [])]}
                           for li in range(4)}
    assert report.removed_attention_blocks == [1] and report.removed_mlp_blocks == [2]
    assert isinstance(model.model.layers[1].self_attn, ZeroAttention) and isinstance(model.model.layers[2].mlp, ZeroMLP)
    removed = sum(len(PLAN[li].get("attention", [])) * costs["attention"] + len(PLAN[li].get("mlp", [])) * costs["mlp"]
                  for li in PLAN)
    assert report.pruned_parameters == removed
    assert report.ungrouped_parameters == costs["head_norms"]
    assert costs["head_norms"] == (2 * model.config.head_dim if key in ("tiny-qwen3", "tiny-gemma3") else 0)
    assert report.params_before - report.params_after == removed + costs["head_norms"]
    assert report.params_after == count_parameters(model)
    # the adapter reads the pruned, uneven model
    assert [adapter.attention_groups(model, li) for li in range(4)] == [1, 0, 2, 1]
    assert [adapter.mlp_groups(model, li) for li in range(4)] == [85, 126, 0, 64]
    assert adapter.prunable_parameters(model) == costs["prunable"] - removed
    again = run_importance(model, adapter, TOKENS, method="magnitude", batch_size=BS)
    assert again.metadata["attention_groups"] == [1, 0, 2, 1] and again.metadata["mlp_groups"] == [85, 126, 0, 64]
    assert torch.isfinite(again.attention[~again.attention.isnan()]).all()


@pytest.mark.parametrize("key", KEYS)
def test_save_and_load_pruned_give_identical_logits(key: str, tmp_path: Path) -> None:
    model, report, _, _ = pruned(key)
    tokenizer = make_tokenizer()
    folder = save_pruned(model, tokenizer, tmp_path / "model", kept=report.kept, source={"spec": key}, session={})
    recipe = read_recipe(folder)
    assert recipe["model_type"] == model.config.model_type and recipe["parameters"] == count_parameters(model)
    loaded, loaded_tokenizer = load_pruned(folder, device="cpu")
    assert type(loaded) is type(model) and loaded_tokenizer is not None
    assert count_parameters(loaded) == count_parameters(model)
    assert loaded.config._attn_implementation == model.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
        generated = greedy(loaded)
        assert torch.equal(generated, greedy(model))
    ids = loaded_tokenizer("Hello", return_tensors="pt").input_ids
    out = loaded.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                          pad_token_id=loaded_tokenizer.pad_token_id)
    assert out.shape == (1, ids.shape[1] + 3)
    adapter = get_adapter(loaded)
    assert [adapter.attention_groups(loaded, li) for li in range(4)] == [1, 0, 2, 1]
    assert [adapter.mlp_groups(loaded, li) for li in range(4)] == [85, 126, 0, 64]


@pytest.mark.parametrize("method", method_keys())
@pytest.mark.parametrize("key", ("tiny-llama", "tiny-qwen3", "tiny-phi3"))
def test_a_pruned_model_is_scored_like_the_masked_original(key: str, method: str) -> None:
    """Scoring an already pruned model (iterative pruning, `prune run` on a saved pruned folder) works
    with uneven layers and removed blocks, and each kept group scores exactly what it scores in the
    original model with the removed groups masked: the two compute the same function, so the kept
    weights see the same gradients and inputs."""
    model, _, _, _ = pruned(key)
    adapter = get_adapter(model)
    original = _model(key)
    original_adapter = get_adapter(original)
    got = run_importance(model, adapter, TOKENS, method=method, batch_size=BS)
    with masked(original, original_adapter, PLAN):
        want = run_importance(original, original_adapter, TOKENS, method=method, batch_size=BS)
    for block, groups in (("attention", 2), ("mlp", 128)):
        scores_got, scores_want = getattr(got, block), getattr(want, block)
        for li in range(4):
            kept = [g for g in range(groups) if g not in PLAN[li].get(block, [])]
            row = scores_got[li]
            assert row[:len(kept)].isfinite().all() and row[len(kept):].isnan().all(), (key, method, block, li)
            torch.testing.assert_close(row[:len(kept)], scores_want[li, kept], rtol=1e-9, atol=1e-12,
                                       msg=f"{key} {method} {block} layer {li}")
