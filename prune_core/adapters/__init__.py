"""Architecture adapters: one small file per model family; `get_adapter` picks one by config.model_type."""

from __future__ import annotations

from torch import nn

from prune_core.adapters.base import Adapter, LayerParts
from prune_core.adapters.gemma2 import Gemma2Adapter
from prune_core.adapters.gemma3 import Gemma3Adapter
from prune_core.adapters.llama import LlamaAdapter
from prune_core.adapters.mistral import MistralAdapter
from prune_core.adapters.phi3 import Phi3Adapter
from prune_core.adapters.qwen2 import Qwen2Adapter
from prune_core.adapters.qwen3 import Qwen3Adapter
from prune_core.adapters.smollm3 import SmolLM3Adapter
from prune_core.errors import BadInput

ADAPTERS: tuple[type[Adapter], ...] = (
    LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma2Adapter, Gemma3Adapter, Phi3Adapter,
    SmolLM3Adapter,
)
SUPPORTED: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)

# What a new family's adapter must declare (the fix of every "unsupported architecture" refusal).
ADAPTER_CONTRACT = (
    "an adapter (one file in prune_core/adapters/, listed in ADAPTERS) that declares model_types (the "
    "config.model_type values it handles); where the decoder layers are (layers_path) and each layer's "
    "attention and MLP modules (attn_name, mlp_name); and per layer a LayerLayout: for the attention "
    "block and the MLP, how many groups (KV heads, channels) there are and which rows or columns of "
    "which linears each group owns (Slice), plus the block's output projection; resize() if its modules "
    "cache sizes that surgery must update, and attn_implementation if sdpa cannot run the family"
)


def unsupported(model_type: str) -> BadInput:
    """The refusal of a model type no adapter handles: the supported ones and what an adapter declares."""
    return BadInput(
        f"unsupported architecture {model_type!r} (supported: {', '.join(SUPPORTED)})",
        f"use a model of a supported family, or add {ADAPTER_CONTRACT}",
    )


def adapter_for_type(model_type: str) -> Adapter:
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls()
    raise unsupported(model_type)


def get_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return adapter_for_type(str(model_type))


__all__ = ["ADAPTERS", "ADAPTER_CONTRACT", "SUPPORTED", "Adapter", "LayerParts", "adapter_for_type", "get_adapter",
           "unsupported"]
