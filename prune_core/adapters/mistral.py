"""Adapter for Mistral (MistralForCausalLM): Llama's layout with sliding-window attention."""

from __future__ import annotations

from prune_core.adapters.base import Adapter


class MistralAdapter(Adapter):
    model_types = ("mistral",)
