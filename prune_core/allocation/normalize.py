"""Normalization and clipping of group importance before the global ranking.

Raw importance scales differ wildly between layers and between attention and MLP, so a global
ranking can wipe out a whole layer. Normalizing per unit puts units on a common scale.

Units (`level`):
- "layer": all groups of a layer together;
- "block": a layer's attention groups and its MLP channels separately;
- "none":  normalization is off (`method` is ignored); clipping, if asked, is global.

Order: clip, then normalize, then score = importance / cost (cost is never changed).

Clipping (`clip = [low, high]` percentiles, 0-100): importance is clipped to the unit's `low` and
`high` percentiles (numpy's default linear interpolation), or to the global percentiles when level
is "none". An empty `clip` does nothing.

Methods, per unit, x = importance:
- minmax: (x − min) / (max − min)
- zscore: (x − mean) / std with the population std (ddof = 0)
- log:    log(x − min + 1)  (computed as log1p(x − min); always ≥ 0)
- sqrt:   sqrt(max(x, 0))   (negatives, possible after a corrected second-order score, clamp to 0)
- mean:   x / mean(x)       equalizes the units' scales and keeps every ratio inside a unit (the order
          and the relative gaps within a block stay; log and minmax flatten them, which is why the
          seeds' block-wise log can multiply the perplexity by 9). A unit whose mean is ≤ 0 gives 0.

Degenerate units (one group, or every value equal, i.e. max == min exactly) give 0.0 for every group
under minmax and zscore (never NaN); log gives log(1) = 0 there anyway, sqrt is element-wise.
Ties and zero / negative normalized values are handled by the ranking in `select`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from prune_core.allocation.table import _safe_score, _type_codes
from prune_core.errors import BadInput

LEVELS = ("none", "layer", "block")
METHODS = ("log", "minmax", "zscore", "sqrt", "mean")


def unit_ids(table: pd.DataFrame, level: str) -> np.ndarray:
    """Integer unit id per row: 0 everywhere ("none"), the layer ("layer"), 2·layer + type ("block")."""
    layer = table["layer_idx"].to_numpy().astype(np.int64)
    if level == "none":
        return np.zeros(len(table), dtype=np.int64)
    if level == "layer":
        return layer
    if level == "block":
        return 2 * layer + _type_codes(table).astype(np.int64)
    raise BadInput(f"unknown normalization level {level!r}", f"use one of {', '.join(LEVELS)}")


def _per_unit(values: np.ndarray, units: np.ndarray, how: str) -> np.ndarray:
    """Broadcast a per-unit statistic back to the rows (pandas groupby, vectorized)."""
    s = pd.Series(values, copy=False)
    if how == "std":
        return s.groupby(units, sort=False).transform("std", ddof=0).to_numpy(dtype=np.float64)
    return s.groupby(units, sort=False).transform(how).to_numpy(dtype=np.float64)


def _per_unit_quantile(values: np.ndarray, units: np.ndarray, q: float) -> np.ndarray:
    uniq, inverse = np.unique(units, return_inverse=True)
    if len(uniq) == 1:
        return np.full(values.shape, np.percentile(values, q * 100.0))
    per = pd.Series(values, copy=False).groupby(inverse).quantile(q)
    lookup = per.reindex(np.arange(len(uniq))).to_numpy(dtype=np.float64)
    return lookup[inverse]


def clip_values(values: np.ndarray, units: np.ndarray, clip: Sequence[float]) -> np.ndarray:
    if not clip:
        return values
    if len(clip) != 2 or not 0.0 <= clip[0] < clip[1] <= 100.0:
        raise BadInput(f"clip {list(clip)} is not [low, high] percentiles",
                       "use [] or [low, high] with 0 <= low < high <= 100")
    low = _per_unit_quantile(values, units, clip[0] / 100.0)
    high = _per_unit_quantile(values, units, clip[1] / 100.0)
    return np.minimum(np.maximum(values, low), high)


def normalize_values(values: np.ndarray, units: np.ndarray, method: str) -> np.ndarray:
    if method == "sqrt":
        return np.sqrt(np.maximum(values, 0.0))
    if method == "mean":
        mean = _per_unit(values, units, "mean")
        ok = mean > 0
        return np.where(ok, values / np.where(ok, mean, 1.0), 0.0)
    lo = _per_unit(values, units, "min")
    if method == "log":
        return np.log1p(values - lo)
    hi = _per_unit(values, units, "max")
    flat = hi == lo
    if method == "minmax":
        span = np.where(flat, 1.0, hi - lo)
        return np.where(flat, 0.0, (values - lo) / span)
    if method == "zscore":
        mean = _per_unit(values, units, "mean")
        std = _per_unit(values, units, "std")
        ok = ~flat & (std > 0)
        return np.where(ok, (values - mean) / np.where(ok, std, 1.0), 0.0)
    raise BadInput(f"unknown normalization method {method!r}", f"use one of {', '.join(METHODS)}")


def normalize(table: pd.DataFrame, *, level: str, method: str, clip: Sequence[float] = ()) -> pd.DataFrame:
    """A copy of `table` with importance clipped / normalized per unit and score recomputed."""
    if level not in LEVELS:
        raise BadInput(f"unknown normalization level {level!r}", f"use one of {', '.join(LEVELS)}")
    if level != "none" and method not in METHODS:
        raise BadInput(f"unknown normalization method {method!r}", f"use one of {', '.join(METHODS)}")
    out = table.copy()
    if level == "none" and not clip:
        return out
    values = out["importance"].to_numpy(dtype=np.float64, copy=True)
    units = unit_ids(out, level)
    values = clip_values(values, units, clip)
    if level != "none":
        values = normalize_values(values, units, method)
    out["importance"] = values
    out["score"] = _safe_score(values, out["cost"].to_numpy())
    return out
