"""A fused-projection family needs only its adapter's group-layout declaration.

`Phi3Adapter` (prune_core/adapters/phi3.py) declares Phi-3's layout (q/k/v fused into `qkv_proj`,
gate/up into `gate_up_proj`) and nothing else. Importance, surgery and export read its layout; the
checks compare a tiny random Phi-3 with its unfused twin (a Llama with the same weights split:
identical logits), group by group: every method's importance, costs, pruned logits (with and
without bias compensation), and the export round trip.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM

from prune_core.adapters import get_adapter
from prune_core.adapters.phi3 import Phi3Adapter
from prune_core.importance import run_importance
from prune_core.importance.registry import method_keys
from prune_core.surgery import apply_pruning, count_parameters
from tests.test_conformance import unfused_twin

GEOMETRY = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "pad_token_id": 258, "bos_token_id": 256, "eos_token_id": 257,
            "tie_word_embeddings": False, "hidden_act": "silu"}


def twins() -> tuple[nn.Module, nn.Module]:
    """(Phi-3, Llama with the same weights split), float64, eval mode."""
    torch.manual_seed(7)
    fused = Phi3ForCausalLM(Phi3Config(**GEOMETRY, original_max_position_embeddings=128)).double().eval()
    with torch.no_grad():
        for param in fused.parameters():
            if param.dim() == 1:  # norms differ from 1
                param.add_(0.05 * torch.randn_like(param))
    return fused, unfused_twin(fused)


TOKENS = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(3))


def test_twins_agree_and_costs_match() -> None:
    fused, plain = twins()
    torch.testing.assert_close(fused(TOKENS).logits, plain(TOKENS).logits, rtol=1e-12, atol=1e-12)
    fa, pa = Phi3Adapter(), get_adapter(plain)
    for layer in range(3):
        assert fa.attention_groups(fused, layer) == pa.attention_groups(plain, layer) == 2
        assert fa.mlp_groups(fused, layer) == pa.mlp_groups(plain, layer) == 48
        assert fa.attention_group_cost(fused, layer) == pa.attention_group_cost(plain, layer)
        assert fa.mlp_group_cost(fused, layer) == pa.mlp_group_cost(plain, layer) == 3 * 64
    assert fa.prunable_parameters(fused) == pa.prunable_parameters(plain)
    assert fa.describe(fused)["heads"] == 4 and fa.describe(fused)["kv_heads"] == 2


@pytest.mark.parametrize("method", method_keys())
def test_importance_equals_the_unfused_model(method: str) -> None:
    fused, plain = twins()
    aggregations = ("element", "vector") if method.startswith("taylor") else ("element",)
    for aggregation in aggregations:
        # statistics of every element: a thinned sample reads other rows of a fused qkv_proj than of q_proj
        kw = {"method": method, "aggregation": aggregation, "batch_size": 2, "stats_sample": 1.0, "stats_every": 1}
        a = run_importance(fused, Phi3Adapter(), TOKENS, **kw)
        b = run_importance(plain, get_adapter(plain), TOKENS, **kw)
        torch.testing.assert_close(a.attention, b.attention, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(a.mlp, b.mlp, rtol=1e-9, atol=1e-12)
        if b.first_order is not None:
            assert a.first_order is not None
            torch.testing.assert_close(a.first_order["mlp"], b.first_order["mlp"], rtol=1e-9, atol=1e-12)
        for key in ("o_proj", "down_proj"):
            torch.testing.assert_close(a.input_sums[key], b.input_sums[key], rtol=1e-10, atol=1e-10)
        assert a.stats_label == b.stats_label and a.tokens == b.tokens
        for block in ("attention", "mlp", "layer"):
            for stat in ("mean", "norm", "max"):
                assert a.stats[block][stat] == pytest.approx(b.stats[block][stat], rel=1e-9), (block, stat)


PRUNED = {0: {"attention": [1], "mlp": [0, 5, 47]}, 1: {"attention": [0, 1], "mlp": list(range(0, 48, 2))},
          2: {"mlp": list(range(48))}}


@pytest.mark.parametrize("compensate", [False, True])
def test_pruned_logits_equal_the_unfused_model(compensate: bool) -> None:
    fused, plain = twins()
    means = None
    if compensate:
        imp = run_importance(plain, get_adapter(plain), TOKENS, method="wanda", batch_size=2)
        means = imp.input_means()
    ra = apply_pruning(fused, Phi3Adapter(), PRUNED, input_means=means)
    rb = apply_pruning(plain, get_adapter(plain), PRUNED, input_means=means)
    assert ra.kept == rb.kept and ra.pruned_parameters == rb.pruned_parameters
    assert ra.params_before - ra.params_after == rb.params_before - rb.params_after
    assert ra.removed_attention_blocks == [1] and ra.removed_mlp_blocks == [2]
    assert ra.compensated == rb.compensated
    layer0 = fused.model.layers[0]
    assert layer0.self_attn.qkv_proj.weight.shape == (2 * 16 + 16 + 16, 64)
    assert layer0.mlp.gate_up_proj.weight.shape == (2 * 45, 64)
    torch.testing.assert_close(fused(TOKENS).logits, plain(TOKENS).logits, rtol=1e-10, atol=1e-10)
    # generation with the KV cache still works on the pruned fused model
    out = fused.generate(TOKENS[:1, :4], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    # and the fused model can be scored again after surgery (uneven layers)
    again = run_importance(fused, Phi3Adapter(), TOKENS, method="magnitude", batch_size=2)
    assert again.metadata["attention_groups"] == [1, 0, 2] and again.metadata["mlp_groups"] == [45, 24, 0]


def test_export_round_trip(tmp_path) -> None:
    from prune_core.export import load_pruned, save_pruned

    fused, _ = twins()
    assert isinstance(get_adapter(fused), Phi3Adapter)
    imp = run_importance(fused, Phi3Adapter(), TOKENS, method="wanda", batch_size=2)
    report = apply_pruning(fused, Phi3Adapter(), {0: {"attention": [0], "mlp": [1, 2]}, 1: {"mlp": list(range(48))}},
                           input_means=imp.input_means())
    folder = save_pruned(fused, None, tmp_path / "model", kept=report.kept, source={}, session={})
    loaded, tokenizer = load_pruned(folder, device="cpu")
    assert tokenizer is None and count_parameters(loaded) == count_parameters(fused)
    assert torch.equal(loaded(TOKENS).logits, fused(TOKENS).logits)
