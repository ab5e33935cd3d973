"""The importance engine: gradient (taylor, taylor_2nd), activation (wanda) and data-free (magnitude)
passes, block losses.

Modules: registry.py (the importance methods: one MethodSpec per module in methods/), engine.py
(run_importance and the full contract), accumulate.py (Σg, Σn·g² per parameter), hooks.py (input
sums and wanda input norms), groups.py (element → group scores, following the adapter's group
layout), stats.py (live per-layer statistics), state.py (checkpoint / resume), prepare.py (model
set-up and restore), nonfinite.py (naming where a NaN came from), result.py (ImportanceResult),
block_loss.py, allocator.py (glibc malloc thresholds for CPU passes: applied by the `prune` process at
its start, never by the engine).

The names below are imported lazily, so `prune_core.importance.registry` (read by the session
schema and the TUI) can be imported without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prune_core.importance.accumulate import GradientAccumulator
    from prune_core.importance.block_loss import BlockImportance, block_importance
    from prune_core.importance.engine import batch_slices, run_importance
    from prune_core.importance.registry import METHODS, get_method, method_keys
    from prune_core.importance.result import ImportanceResult

_LAZY: dict[str, str] = {
    "GradientAccumulator": "accumulate",
    "BlockImportance": "block_loss",
    "block_importance": "block_loss",
    "batch_slices": "engine",
    "run_importance": "engine",
    "METHODS": "registry",
    "get_method": "registry",
    "method_keys": "registry",
    "ImportanceResult": "result",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prune_core.importance' has no attribute {name!r}")
    value = getattr(import_module(f"prune_core.importance.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "METHODS",
    "BlockImportance",
    "GradientAccumulator",
    "ImportanceResult",
    "batch_slices",
    "block_importance",
    "get_method",
    "method_keys",
    "run_importance",
]
