"""Architecture adapters: one small file per model family; `get_adapter` picks one by config.model_type."""

from __future__ import annotations

from torch import nn

from prune_core.adapters.base import Adapter, LayerParts
from prune_core.adapters.llama import LlamaAdapter
from prune_core.adapters.mistral import MistralAdapter
from prune_core.adapters.qwen2 import Qwen2Adapter
from prune_core.errors import BadInput

ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter)
SUPPORTED: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def adapter_for_type(model_type: str) -> Adapter:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise BadInput(
        f"unsupported architecture {model_type!r}",
        f"use a model of a supported family ({', '.join(SUPPORTED)}), or add an adapter in prune_core/adapters/",
    )


def get_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return adapter_for_type(str(model_type))


__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "LayerParts", "adapter_for_type", "get_adapter"]
