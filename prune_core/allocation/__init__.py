"""Global allocation: which groups of which layers to prune — the cheap, repeatable what-if part.

Given group importance (from the expensive importance pass) and the model's group costs,
`allocate` runs table → correction → normalization → selection → summary, reading its settings
from the session (`correction.*`, `normalization.*`, `pruning.*`). It takes milliseconds on small
models, so the UI can re-run it on every settings change without touching the model.

    from prune_core.allocation import GroupCosts, allocate
    costs = GroupCosts.from_model(model, adapter)
    alloc = allocate(result, costs, session, block=block_importance)
    alloc.pruned_indices()   # {layer: {"attention": [...], "mlp": [...]}} for surgery.apply_pruning
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from prune_core.allocation.correction import apply_correction
from prune_core.allocation.normalize import normalize
from prune_core.allocation.select import Selection, select
from prune_core.allocation.summary import (
    layer_summary,
    mask_sha256,
    pruned_indices,
    write_summary,
    write_table_csv,
)
from prune_core.allocation.table import GroupCosts, build_table


@dataclass
class Allocation:
    table: pd.DataFrame
    summary: pd.DataFrame  # one row per layer (see summary.layer_summary)
    target_ratio: float
    achieved_ratio: float
    removed_parameters: int
    prunable_parameters: int
    reachable: bool
    message: str
    mask_sha256: str  # see summary.mask_sha256 for the byte format
    num_layers: int = 0

    def pruned_indices(self) -> dict[int, dict[str, list[int]]]:
        """layer -> {"attention": [...], "mlp": [...]} of pruned indices; every layer is present."""
        return pruned_indices(self.table, self.num_layers or None)


def allocate_table(table: pd.DataFrame, costs: GroupCosts, session: Any, block: Any | None = None) -> Allocation:
    """Correction → normalization → selection → summary on a table from `build_table` (the what-if step)."""
    p, c, nz = session.pruning, session.correction, session.normalization
    blocks, mode = p.budget()  # allocation = "auto" resolved by the ratio
    num_layers = costs.num_layers
    corrected = apply_correction(table, block, temperature=c.temperature, tau=c.tau,
                                 depth_weight=p.depth_weight, num_layers=num_layers)
    normalized = weigh_attention(normalize(corrected, level=nz.level, method=nz.method, clip=nz.clip),
                                 getattr(p, "attention_weight", 1.0))
    sel: Selection = select(normalized, ratio=p.ratio, prunable_total=costs.prunable_total,
                            min_rate=p.min_rate, max_rate=p.max_rate,
                            protect_layers=resolve_layers(p.protect_layers, num_layers),
                            early_layers=p.early_layers, early_max_rate=p.early_max_rate,
                            blocks=blocks, mode=mode,
                            depth_ramp=getattr(p, "depth_ramp", 0.0), global_share=getattr(p, "global_share", 0.0))
    normalized["pruned"] = sel.pruned
    return Allocation(
        table=normalized,
        summary=layer_summary(normalized, num_layers),
        target_ratio=sel.target_ratio,
        achieved_ratio=sel.achieved_ratio,
        removed_parameters=sel.removed_parameters,
        prunable_parameters=sel.prunable_parameters,
        reachable=sel.reachable,
        message=sel.message,
        mask_sha256=mask_sha256(normalized),
        num_layers=num_layers,
    )


def resolve_layers(layers: Any, num_layers: int) -> list[int]:
    """Layer indices with negative ones counted from the end (-1 = the last layer), sorted, in range."""
    return sorted({i if i >= 0 else num_layers + i for i in layers if -num_layers <= i < num_layers})


def weigh_attention(table: pd.DataFrame, weight: float) -> pd.DataFrame:
    """Attention groups' scores × `weight` (÷ for negative scores), so > 1 prunes attention less, < 1 more."""
    if weight == 1.0:
        return table
    out = table.copy()
    att = (out["group_type"] == "attention").to_numpy()
    score = out["score"].to_numpy(dtype=np.float64, copy=True)
    scaled = np.where(score >= 0, score * weight, score / max(weight, 1e-12))
    out["score"] = np.where(att, scaled, score)
    return out


def allocate(result: Any, costs: GroupCosts, session: Any, block: Any | None = None) -> Allocation:
    """Build the group table from `result` (an ImportanceResult) and allocate with the session's settings."""
    return allocate_table(build_table(result, costs), costs, session, block)


__all__ = [
    "Allocation",
    "GroupCosts",
    "Selection",
    "allocate",
    "allocate_table",
    "apply_correction",
    "build_table",
    "layer_summary",
    "mask_sha256",
    "normalize",
    "pruned_indices",
    "select",
    "write_summary",
    "write_table_csv",
]
