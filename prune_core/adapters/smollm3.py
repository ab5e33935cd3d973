"""Adapter for SmolLM3 (SmolLM3ForCausalLM, model_type "smollm3"): Llama's layout, some layers without RoPE.

SmolLM3 skips rotary embeddings in every `no_rope_layer_interval`-th layer (`config.no_rope_layers`,
cached per attention module as `use_rope`). Positions are applied per head, so removing whole KV
groups is the same with and without RoPE, and surgery replaces only the linears (the flag stays).
With `mlp_bias` the gate/up biases belong to their channels and down_proj's bias stays outside
every group, as the base layout declares.
"""

from __future__ import annotations

from prune_core.adapters.base import Adapter


class SmolLM3Adapter(Adapter):
    model_types = ("smollm3",)
