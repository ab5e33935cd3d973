"""Adapters: group membership and cost on each tiny model; costs sum to the prunable total."""

from __future__ import annotations

import pytest
import torch

from prune_core.adapters import SUPPORTED, adapter_for_type, get_adapter
from prune_core.errors import BadInput
from prune_core.models import resolve_model


@pytest.mark.parametrize("key", ["tiny-llama", "tiny-mistral", "tiny-qwen2"])
def test_groups_and_costs(key: str) -> None:
    model = resolve_model(key, device="cpu").model
    adapter = get_adapter(model)
    cfg = model.config
    L = cfg.num_hidden_layers
    assert adapter.num_layers(model) == L
    total = 0
    for layer in range(L):
        parts = adapter.parts(model, layer)
        d, h = parts.head_dim, cfg.hidden_size
        r = cfg.num_attention_heads // cfg.num_key_value_heads
        assert adapter.attention_groups(model, layer) == cfg.num_key_value_heads
        assert adapter.mlp_groups(model, layer) == cfg.intermediate_size
        has_bias = parts.q_proj.bias is not None
        assert has_bias == (key == "tiny-qwen2")
        # count the parameters of group 0 by slicing the modules by hand
        rows_q, rows_kv = slice(0, r * d), slice(0, d)
        manual = (parts.q_proj.weight[rows_q].numel() + parts.k_proj.weight[rows_kv].numel()
                  + parts.v_proj.weight[rows_kv].numel() + parts.o_proj.weight[:, rows_q].numel())
        if has_bias:
            manual += parts.q_proj.bias[rows_q].numel() + parts.k_proj.bias[rows_kv].numel()
            manual += parts.v_proj.bias[rows_kv].numel()
        assert adapter.attention_group_cost(model, layer) == manual
        mlp_manual = parts.gate_proj.weight[0].numel() + parts.up_proj.weight[0].numel()
        mlp_manual += parts.down_proj.weight[:, 0].numel()
        assert adapter.mlp_group_cost(model, layer) == mlp_manual == 3 * h
        total += (cfg.num_key_value_heads * adapter.attention_group_cost(model, layer)
                  + cfg.intermediate_size * adapter.mlp_group_cost(model, layer))
    # prunable total = every attention and MLP weight (+ q/k/v biases), nothing else
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    assert adapter.prunable_parameters(model) == total == expected


def test_unsupported_family_lists_supported() -> None:
    with pytest.raises(BadInput) as info:
        adapter_for_type("gpt2")
    for family in SUPPORTED:
        assert family in str(info.value)
    assert set(SUPPORTED) >= {"llama", "mistral", "qwen2"}


def test_describe_reports_geometry() -> None:
    model = resolve_model("tiny-llama", device="cpu").model
    d = get_adapter(model).describe(model)
    assert d["layers"] == model.config.num_hidden_layers
    assert d["heads"] == model.config.num_attention_heads and d["kv_heads"] == model.config.num_key_value_heads
    assert d["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert isinstance(torch.__version__, str)
