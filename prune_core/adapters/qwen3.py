"""Adapter for Qwen3 (Qwen3ForCausalLM): Llama's layout plus per-head `q_norm` / `k_norm`.

Qwen3 normalises every query and key head with an RMSNorm over `head_dim` *after* the projection
is viewed as heads; the norm's weight is one `[head_dim]` vector shared by all heads. So the norms
belong to no group and are not prunable parameters: removing a KV group (its k/v rows and its r
query heads' q rows and o_proj columns) leaves them as they are, and every kept head is still
normalised by the same weight. A dependency-graph pruner that ties `q_norm.weight` to q_proj's
output channels concludes the attention block cannot be pruned (LLM-Pruner#96, "leads to not
pruning self_attn layers"); the declared layout here prunes it like Llama's.

The layout check below refuses a checkpoint whose q/k norm is not per head (a norm over all heads,
as in OLMo 2, would have to be sliced with the groups and is not what this adapter declares).
"""

from __future__ import annotations

from torch import nn

from prune_core.adapters.base import Adapter, LayerLayout, check_head_norms


class Qwen3Adapter(Adapter):
    model_types = ("qwen3",)

    def layout(self, model: nn.Module, layer_idx: int) -> LayerLayout:
        check_head_norms(self, model, layer_idx, ("q_norm", "k_norm"))
        return super().layout(model, layer_idx)
