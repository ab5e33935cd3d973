"""Adapter for Llama (LlamaForCausalLM): model.layers[i].self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj."""

from __future__ import annotations

from prune_core.adapters.base import Adapter


class LlamaAdapter(Adapter):
    model_types = ("llama",)
