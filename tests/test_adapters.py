"""Adapters: group membership and cost on each tiny model; costs sum to the prunable total; what an
adapter refuses (unsupported families, q/k norms that are not per head)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from prune_core.adapters import ADAPTER_CONTRACT, SUPPORTED, adapter_for_type, get_adapter
from prune_core.errors import BadInput
from prune_core.models import resolve_model
from prune_core.surgery import apply_pruning
from prune_core.tiny import build_tiny

# the families with separate q/k/v/o and gate/up/down projections (Phi-3's fused ones: test_fused_layout.py)
SEPARATE = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-smollm3"]


@pytest.mark.parametrize("key", SEPARATE)
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


def test_unsupported_family_lists_supported_and_what_an_adapter_declares() -> None:
    with pytest.raises(BadInput) as info:
        adapter_for_type("gpt2")
    for family in SUPPORTED:
        assert family in str(info.value)
    assert set(SUPPORTED) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "smollm3"}
    assert info.value.fix is not None and ADAPTER_CONTRACT in info.value.fix
    for declared in ("model_types", "layers_path", "LayerLayout", "Slice", "output projection", "resize()"):
        assert declared in ADAPTER_CONTRACT
    # a model object is refused the same way, before anything reads its modules
    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
    with pytest.raises(BadInput, match="unsupported architecture 'gpt2'"):
        get_adapter(gpt2)


@pytest.mark.parametrize("key", ["tiny-gemma2", "tiny-gemma3"])
def test_gemma_head_dim_is_its_own(key: str) -> None:
    """Gemma's head_dim (24 here) is not hidden / heads (16): groups and costs follow head_dim."""
    model, _ = build_tiny(key)
    adapter = get_adapter(model)
    d, h, r = 24, 64, 2
    assert model.config.head_dim == d != model.config.hidden_size // model.config.num_attention_heads
    layout = adapter.layout(model, 0).attention
    assert (layout.groups, layout.heads_per_group, layout.head_dim) == (2, r, d)
    assert adapter.attention_group_cost(model, 0) == (r * d + 2 * d) * h + h * r * d
    assert adapter.describe(model)["head_dim"] == d
    assert model.config._attn_implementation == ("eager" if key == "tiny-gemma2" else "sdpa")


@pytest.mark.parametrize("key", ["tiny-qwen3", "tiny-gemma3"])
def test_per_head_qk_norms_survive_removing_kv_groups(key: str) -> None:
    """Qwen3 / Gemma 3 q_norm, k_norm: one [head_dim] weight shared by every head; no group owns it,
    removing KV groups keeps it as it is and the layer keeps normalising each kept head with it."""
    model, _ = build_tiny(key)
    adapter = get_adapter(model)
    attn = model.model.layers[0].self_attn
    d = attn.head_dim
    before = {n: getattr(attn, n).weight.detach().clone() for n in ("q_norm", "k_norm")}
    assert all(w.shape == (d,) for w in before.values())
    apply_pruning(model, adapter, {0: {"attention": [0]}})
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * d and attn.k_proj.out_features == d
    for name, weight in before.items():
        assert torch.equal(getattr(attn, name).weight, weight)
    assert adapter.attention_groups(model, 0) == 1


@pytest.mark.parametrize("key", ["tiny-qwen3", "tiny-gemma3"])
def test_qk_norm_over_all_heads_is_refused(key: str) -> None:
    """A q/k norm over all heads (OLMo 2 style) would have to be sliced with the groups: refused."""
    model, _ = build_tiny(key)
    attn = model.model.layers[2].self_attn
    attn.q_norm = nn.RMSNorm(attn.q_proj.out_features)
    q_width, d = attn.q_proj.out_features, attn.head_dim
    message = rf"layer 2: self_attn\.q_norm has weight shape \({q_width},\), expected \({d},\)"
    with pytest.raises(BadInput, match=message):
        get_adapter(model).layout(model, 2)
    get_adapter(model).layout(model, 1)  # the other layers are fine


def test_describe_reports_geometry() -> None:
    model = resolve_model("tiny-llama", device="cpu").model
    d = get_adapter(model).describe(model)
    assert d["layers"] == model.config.num_hidden_layers
    assert d["heads"] == model.config.num_attention_heads and d["kv_heads"] == model.config.num_key_value_heads
    assert d["total_parameters"] == sum(p.numel() for p in model.parameters())
    assert isinstance(torch.__version__, str)
