"""The importance engine: gradient (taylor, taylor_2nd) and activation (wanda) passes, block losses.

Modules: engine.py (run_importance and the full contract), accumulate.py (Σg, Σn·g² per parameter),
hooks.py (input sums and wanda input norms), groups.py (element → group scores), stats.py (live
per-layer statistics), state.py (checkpoint / resume), prepare.py (model set-up and restore),
nonfinite.py (naming where a NaN came from), result.py (ImportanceResult), block_loss.py,
allocator.py (glibc malloc thresholds for CPU passes).
"""

from prune_core.importance.accumulate import GradientAccumulator
from prune_core.importance.block_loss import BlockImportance, block_importance
from prune_core.importance.engine import METHODS, batch_slices, run_importance
from prune_core.importance.result import ImportanceResult

__all__ = [
    "METHODS",
    "BlockImportance",
    "GradientAccumulator",
    "ImportanceResult",
    "batch_slices",
    "block_importance",
    "run_importance",
]
