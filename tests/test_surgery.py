"""Surgery: exact parameter counts, equivalence with masking, full-block removal, bias compensation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from prune_core.adapters import get_adapter
from prune_core.allocation import GroupCosts, allocate
from prune_core.errors import BadInput
from prune_core.surgery import SurgeryReport, ZeroAttention, ZeroMLP, apply_pruning, count_parameters
from sessions.schema import Session

FAMILIES = ("llama", "mistral", "qwen2")


def tiny(family: str, *, layers: int = 3, tie: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=tie, initializer_range=0.2)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=6))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))  # q/k/v biases
    return model.eval()


def masked_copy(model: nn.Module, pruned: dict[int, dict[str, list[int]]]) -> nn.Module:
    """The unpruned model with the pruned groups' o_proj / down_proj input columns zeroed."""
    import copy

    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    with torch.no_grad():
        for li, spec in pruned.items():
            p = adapter.parts(ref, li)
            w = p.group_size * p.head_dim
            for k in spec.get("attention", []):
                p.o_proj.weight[:, k * w:(k + 1) * w] = 0
            for j in spec.get("mlp", []):
                p.down_proj.weight[:, j] = 0
    return ref


PRUNE = {0: {"attention": [1], "mlp": [0, 5, 47]}, 1: {"attention": [0, 1]}, 2: {"mlp": list(range(48))}}


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_parameter_count_and_masking_equivalence(family: str) -> None:
    model = tiny(family)
    adapter = get_adapter(model)
    costs = GroupCosts.from_model(model, adapter)
    ref = masked_copy(model, PRUNE)
    config_before = model.config.to_dict()
    before = count_parameters(model)
    report = apply_pruning(model, adapter, PRUNE)
    expected = sum(len(v.get("attention", [])) * costs.attention[li] + len(v.get("mlp", [])) * costs.mlp[li]
                   for li, v in PRUNE.items())
    assert isinstance(report, SurgeryReport)
    assert report.params_before == before
    assert report.pruned_parameters == expected
    assert report.params_after == before - expected == count_parameters(model)
    assert report.kept[0] == {"attention": [0], "mlp": [j for j in range(48) if j not in (0, 5, 47)]}
    assert report.kept[1]["attention"] == [] and report.kept[2]["mlp"] == []
    assert report.removed_attention_blocks == [1] and report.removed_mlp_blocks == [2]
    assert report.compensated == [] and report.added_bias_parameters == 0
    assert model.config.to_dict() == config_before

    layer0 = adapter.parts(model, 0)
    assert layer0.q_proj.weight.shape == (16, 32) and layer0.k_proj.weight.shape == (8, 32)
    assert layer0.o_proj.weight.shape == (32, 16) and layer0.gate_proj.weight.shape == (45, 32)
    if family == "qwen2":
        assert layer0.q_proj.bias.shape == (16,) and layer0.k_proj.bias.shape == (8,)
    assert isinstance(adapter.layers(model)[1].self_attn, ZeroAttention)
    assert isinstance(adapter.layers(model)[2].mlp, ZeroMLP)

    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_block_removal_forward_and_generate(family: str) -> None:
    model = tiny(family, layers=3)
    adapter = get_adapter(model)
    # layer 0's attention (the cache length is read from layer 0) and layer 1's MLP removed entirely
    apply_pruning(model, adapter, {0: {"attention": [0, 1]}, 1: {"mlp": list(range(48))},
                                   2: {"attention": [1], "mlp": list(range(20))}})
    ids = torch.randint(0, 64, (1, 7))
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
        no_cache = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
        assert out.sequences.shape == (1, 17)
        assert torch.equal(out.sequences, no_cache)
        # logits produced step by step with the KV cache equal one full forward pass
        full = model(out.sequences).logits
        for step, logits in enumerate(out.logits):
            torch.testing.assert_close(logits[0], full[0, 6 + step], atol=1e-4, rtol=1e-4)
        # manual incremental decoding (positions derived from the cache length, which layer 0 must keep)
        cache = DynamicCache(config=model.config)
        step = model(out.sequences[:, :5], past_key_values=cache, use_cache=True)
        logits = [step.logits[:, -1]]
        for i in range(5, 16):
            step = model(out.sequences[:, i:i + 1], past_key_values=step.past_key_values, use_cache=True)
            logits.append(step.logits[:, -1])
        torch.testing.assert_close(torch.stack(logits, 1), full[:, 4:16], atol=1e-4, rtol=1e-4)


def test_pruned_model_is_smaller_and_trains() -> None:
    model = tiny("llama")
    adapter = get_adapter(model)
    apply_pruning(model, adapter, {i: {"attention": [0], "mlp": list(range(24))} for i in range(3)})
    ids = torch.randint(0, 64, (2, 9))
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert adapter.parts(model, 0).gate_proj.weight.grad is not None


def test_allocation_drives_surgery_exactly() -> None:
    model = tiny("qwen2", layers=4)
    adapter = get_adapter(model)
    costs = GroupCosts.from_model(model, adapter)
    g = torch.Generator().manual_seed(1)
    result = type("R", (), {"attention": torch.rand(4, 2, generator=g, dtype=torch.float64),
                            "mlp": torch.rand(4, 48, generator=g, dtype=torch.float64)})()
    alloc = allocate(result, costs, Session.model_validate({"pruning": {"ratio": 0.45}}))
    before = count_parameters(model)
    report = apply_pruning(model, adapter, alloc.pruned_indices())
    assert report.params_after == before - alloc.removed_parameters
    assert count_parameters(model) == before - alloc.removed_parameters


def test_bad_indices() -> None:
    model = tiny("llama")
    adapter = get_adapter(model)
    with pytest.raises(BadInput):
        apply_pruning(model, adapter, {0: {"attention": [2]}})
    with pytest.raises(BadInput):
        apply_pruning(model, adapter, {5: {"mlp": [0]}})
    with pytest.raises(BadInput):
        apply_pruning(model, adapter, {0: {"mlp": [1]}}, input_means={"o_proj": torch.zeros(3, 32)})
    apply_pruning(model, adapter, {1: {"attention": [0, 1]}})
    with pytest.raises(BadInput, match="already"):  # re-pruning a model with a removed block
        apply_pruning(model, adapter, {0: {"mlp": [1]}})


def capture_inputs(model: nn.Module, adapter, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Inputs of every layer's o_proj and down_proj, [tokens, features]."""
    seen: dict[str, list[torch.Tensor]] = {"o_proj": [], "down_proj": []}
    hooks = []
    for li in range(adapter.num_layers(model)):
        p = adapter.parts(model, li)
        for name, mod in (("o_proj", p.o_proj), ("down_proj", p.down_proj)):
            hooks.append(mod.register_forward_pre_hook(
                lambda _m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]).detach())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_bias_compensation_reduces_output_error(family: str) -> None:
    import copy

    model = tiny(family, layers=2, seed=3)
    adapter = get_adapter(model)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    inputs = capture_inputs(model, adapter, ids)
    means = {k: torch.stack([x.double().mean(0) for x in v]) for k, v in inputs.items()}
    originals = {li: (copy.deepcopy(adapter.parts(model, li).o_proj), copy.deepcopy(adapter.parts(model, li).down_proj))
                 for li in range(2)}
    prune = {0: {"attention": [0], "mlp": list(range(0, 48, 3))}, 1: {"attention": [0, 1], "mlp": list(range(48))}}

    plain, comp = copy.deepcopy(model), copy.deepcopy(model)
    apply_pruning(plain, adapter, prune)
    report = apply_pruning(comp, adapter, prune, input_means=means)
    assert report.compensated == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj",
                                  "model.layers.1.self_attn", "model.layers.1.mlp"]
    assert report.added_bias_parameters == 4 * 32
    assert report.params_after == report.params_before - report.pruned_parameters + 4 * 32

    for li in range(2):
        o_ref, d_ref = originals[li]
        kept = report.kept[li]
        d = 8 * 2  # head_dim × query heads per KV head
        o_cols = [k * d + i for k in kept["attention"] for i in range(d)]
        for name, ref, cols in (("o_proj", o_ref, o_cols), ("down_proj", d_ref, kept["mlp"])):
            x = inputs[name][li]
            target = ref(x)
            errors = []
            for m in (plain, comp):
                layer = adapter.layers(m)[li]
                block = layer.self_attn if name == "o_proj" else layer.mlp
                if isinstance(block, ZeroAttention | ZeroMLP):
                    out = torch.zeros_like(target) + (0 if block.bias is None else block.bias)
                else:
                    out = getattr(block, name)(x[:, cols])
                errors.append(float(((out - target) ** 2).mean().detach()))
            assert errors[1] < errors[0], (li, name, errors)

    # the constant of a fully removed block is W · mean (+ the original bias)
    zero = adapter.layers(comp)[1].mlp
    expect = (originals[1][1].weight.double() @ means["down_proj"][1]).float()
    if originals[1][1].bias is not None:
        expect = expect + originals[1][1].bias
    torch.testing.assert_close(zero.bias.detach(), expect, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert torch.isfinite(comp(ids).logits).all()
