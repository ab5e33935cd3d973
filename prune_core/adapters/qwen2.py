"""Adapter for Qwen2 (Qwen2ForCausalLM): Llama's layout with q/k/v biases, which belong to the groups."""

from __future__ import annotations

from prune_core.adapters.base import Adapter


class Qwen2Adapter(Adapter):
    model_types = ("qwen2",)
