"""Adapter for Gemma 2 (Gemma2ForCausalLM, model_type "gemma2"): Llama's group layout, wider heads.

The prunable modules and groups are Llama's (separate q/k/v/o and gate/up/down projections, no
biases); what differs does not touch the layout:
- head_dim is its own config value, not hidden / heads (2B: 8 × 256 over hidden 2304), read off
  the attention module, and the attention scale is query_pre_attn_scalar^-0.5, independent of
  how many heads are kept;
- the extra post-attention / pre- and post-feed-forward RMSNorms act on the hidden size, which
  pruning never changes (a block removed entirely outputs zeros, which its post-norm keeps zero);
- attention-logit and final-logit soft-capping are element-wise on scores and logits;
- the embeddings are tied (and scaled by sqrt(hidden)); they are not prunable;
- sliding-window and global layers alternate; each layer keeps its own mask.
sdpa cannot soft-cap attention logits, so the family runs the eager attention.
"""

from __future__ import annotations

from prune_core.adapters.base import Adapter


class Gemma2Adapter(Adapter):
    model_types = ("gemma2",)
    attn_implementation = "eager"
    residual_outputs = False  # post-attention / post-feed-forward norms
