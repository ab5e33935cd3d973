"""Adapter for the Gemma 3 text causal LM (Gemma3ForCausalLM, model_type "gemma3_text").

Gemma 2's layout (see gemma2.py: head_dim ≠ hidden / heads, query_pre_attn_scalar, sandwich norms,
tied scaled embeddings) plus Qwen3-style per-head `q_norm` / `k_norm`: one RMSNorm weight over
head_dim shared by all heads, so the norms belong to no group and stay as they are when KV groups
are removed (checked per layer, as for Qwen3). Local (sliding-window) and global layers use
different RoPE bases; pruning whole heads leaves both untouched. Gemma 3 has no attention
soft-capping by default, so sdpa is fine.

The multimodal Gemma 3 (model_type "gemma3", Gemma3ForConditionalGeneration: a vision tower and
`model.language_model.layers`) is a different model class and is not handled here.
"""

from __future__ import annotations

from torch import nn

from prune_core.adapters.base import Adapter, LayerLayout, check_head_norms


class Gemma3Adapter(Adapter):
    model_types = ("gemma3_text",)
    residual_outputs = False  # post-attention / post-feed-forward norms

    def layout(self, model: nn.Module, layer_idx: int) -> LayerLayout:
        check_head_norms(self, model, layer_idx, ("q_norm", "k_norm"))
        return super().layout(model, layer_idx)
