"""Disk space: what a run writes below its results folder, and whether the file system there has room.

Why: a run that fills the disk fails at the end, after the expensive passes, when it saves the pruned
model (an 8B model in bfloat16 is ~13 GB); a checkpoint that does not fit fails in the middle. The
writes are atomic, so nothing is corrupted, but the time is lost. So:
- `disk_bytes(parameters, buffers, ...)` prices the three large files a run writes (from the model's config, no
  weights): the saved model (the kept parameters at the session's dtype), the importance pass's
  checkpoint (its float32 sums: Σg, the Fisher sums for taylor_2nd, the input statistics) and the
  distillation's checkpoint (three float32 copies of the trained parameters: weights and AdamW's two
  moments). A checkpoint is written beside the one it replaces before that one goes, so at its
  moment the disk holds two.
- `shortfall(folder, need)`: the free bytes under `folder` when they are fewer than `need` plus a
  10 % margin (None when there is room or the free space cannot be read); `checkpoint_shortfall`
  the warning the importance pass and the distill stage give when they skip a checkpoint for it.
The pre-flight (preflight.py) refuses a run whose saved model would not fit, before anything loads;
the checkpoints guard themselves (a checkpoint that would not fit is skipped with one warning, since
the run itself can still finish), and `prune plan` prints all three figures.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MARGIN = 0.10
FP32 = 4

__all__ = ["MARGIN", "checkpoint_shortfall", "disk_bytes", "free_bytes", "shortfall"]


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent); None if unknown."""
    for place in (folder, *folder.parents):
        if place.exists():
            try:
                return shutil.disk_usage(place).free
            except OSError:
                return None
    return None


def shortfall(folder: Path, need: int) -> int | None:
    """The free bytes under `folder` when they are fewer than `need` plus the margin; None otherwise."""
    free = free_bytes(folder)
    if free is not None and free < need + int(need * MARGIN):
        return free
    return None


def checkpoint_shortfall(folder: Path, tensors: Mapping[str, Any], noun: str, unit: str) -> str | None:
    """The warning for a `noun` checkpoint of `tensors` that would not fit under `folder` (a stop would
    lose the `unit` since the last one), or None when it fits or the free space cannot be read."""
    need = sum(t.numel() * t.element_size() for t in tensors.values())
    free = shortfall(folder, need)
    if free is None:
        return None
    return (f"no {noun} checkpoint written: it needs {need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free "
            f"under {folder.parent}, so a stop would lose the {unit} since the last one; free disk space (or move "
            "output_dir)")


def disk_bytes(parameters: dict[str, int], importance_buffers: dict[str, int], *, element_bytes: int, ratio: float,
               save_model: bool = True, distill_steps: int = 0) -> dict[str, int]:
    """The bytes a run writes (module docstring), from a memplan Geometry's `parameters`, the chosen
    method's `MethodPlan.buffers` and the size of one element of the session's dtype. `peak` is the most
    the results folder holds at once: the largest of the saved model and each checkpoint counted twice."""
    e = element_bytes
    p = parameters
    removed = round((p["attention"] + p["mlp"]) * min(max(ratio, 0.0), 1.0))
    b = importance_buffers
    importance = b.get("grad_sum", 0) + b.get("fisher", 0) + b.get("input_stats", 0)
    distill = 3 * (p["attention"] + p["mlp"] - removed + p["norms"]) * FP32 if distill_steps > 0 else 0
    saved = (p["total"] - removed) * e if save_model else 0
    return {"saved_model": saved, "importance_checkpoint": importance, "distill_checkpoint": distill,
            "peak": max(saved, 2 * importance, 2 * distill)}
