"""Adapter for Phi-3 (Phi3ForCausalLM, model_type "phi3"): fused `qkv_proj` and `gate_up_proj`.

Phi-3 computes q, k and v with one linear, `qkv_proj`, whose output rows are all query heads, then
all key heads, then all value heads; and gate and up with one `gate_up_proj` (gate rows, then up
rows). The group layout declares that: KV head k owns, in qkv_proj, its r·d query rows
[k·r·d, (k+1)·r·d), its d key rows [Q + k·d, …) and its d value rows [Q + K + k·d, …) (three row
ranges of one module; Q = kv·r·d and K = kv·d are the current q and k widths), and r·d columns of
o_proj; MLP channel j owns rows j and I + j of gate_up_proj (I = current channels) and column j of
down_proj. Importance, surgery and export read only this declaration.

Phi3Attention splits qkv_proj with `config.num_attention_heads` and its own `num_key_value_heads`,
so after surgery `resize` gives each pruned attention module its own copy of the config with the
layer's head counts (the model's config stays the original: export relies on it).
"""

from __future__ import annotations

import copy

from torch import nn

from prune_core.adapters.base import Adapter, GroupLayout, LayerLayout, Slice, empty_layout, removed_block


class Phi3Adapter(Adapter):
    model_types = ("phi3",)

    def layout(self, model: nn.Module, layer_idx: int) -> LayerLayout:
        layer = self.layers(model)[layer_idx]
        attn, mlp = getattr(layer, self.attn_name), getattr(layer, self.mlp_name)
        cfg = model.config  # type: ignore[attr-defined]
        r = cfg.num_attention_heads // cfg.num_key_value_heads  # surgery keeps whole groups: r is fixed
        a, m = self.attn_name, self.mlp_name
        if removed_block(attn):
            attention = empty_layout("attention", a)
        else:
            d = self.head_dim(model, attn)
            kv = attn.qkv_proj.out_features // ((r + 2) * d)
            q_rows = kv * r * d
            qkv = f"{a}.qkv_proj"
            attention = GroupLayout(
                block="attention", container=a, groups=kv,
                slices=(Slice(qkv, 0, 0, r * d), Slice(qkv, 0, q_rows, d), Slice(qkv, 0, q_rows + kv * d, d),
                        Slice(f"{a}.o_proj", 1, 0, r * d)),
                output=f"{a}.o_proj", heads_per_group=r, head_dim=d,
            )
        if removed_block(mlp):
            mlp_layout = empty_layout("mlp", m)
        else:
            n = mlp.gate_up_proj.out_features // 2
            mlp_layout = GroupLayout(
                block="mlp", container=m, groups=n,
                slices=(Slice(f"{m}.gate_up_proj", 0, 0, 1), Slice(f"{m}.gate_up_proj", 0, n, 1),
                        Slice(f"{m}.down_proj", 1, 0, 1)),
                output=f"{m}.down_proj",
            )
        return LayerLayout(attention=attention, mlp=mlp_layout)

    def resize(self, model: nn.Module, layer_idx: int, block: str, groups: int) -> None:
        super().resize(model, layer_idx, block, groups)
        if block == "attention":
            attn = getattr(self.layers(model)[layer_idx], self.attn_name)
            config = copy.copy(attn.config)
            r = config.num_attention_heads // config.num_key_value_heads
            config.num_attention_heads, config.num_key_value_heads = groups * r, groups
            attn.config = config
