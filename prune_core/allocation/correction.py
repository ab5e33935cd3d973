"""Block/layer correction and depth weighting of group importance.

Group importance measured locally (per weight) ignores how much a whole block matters to the loss.
The correction rescales every group by how important its block and its layer are relative to the
others, measured by `BlockImportance` (loss increase when a block / layer is removed):

    importance = raw_importance × (b / mean_b)^T × (ℓ / mean_ℓ)^tau × (1 + (1 − l/L) × depth_weight)

- b = block importance of the group's block (`block.attention[l]` for attention groups,
  `block.mlp[l]` for MLP channels); mean_b = mean over all layers of blocks of the same type.
- ℓ = `block.layer[l]`, mean_ℓ = mean over layers.
- Floor: a loss increase can be zero or negative (removing the block helps), and a power of that is
  meaningless, so each of the three vectors is clamped below at `FLOOR_RELATIVE` × its maximum
  (or at `FLOOR_RELATIVE` itself when no value is positive, which makes the ratios all 1) before
  the means are taken.
- T = 0, tau = 0, depth_weight = 0 skip their factor entirely, so with all three zero the result is
  bitwise `raw_importance` (no floating noise from multiplying by 1.0).
- Depth weighting uses l = 0-based layer index and L = `num_layers`: layer 0 gets the full
  (1 + depth_weight), the last layer 1 + depth_weight / L, favouring early layers.

`score` is recomputed from the new importance; `cost` is never touched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from prune_core.allocation.table import _safe_score, _type_codes
from prune_core.errors import BadInput

FLOOR_RELATIVE = 1e-8


def _floored_ratio(values: Any, name: str, num_layers: int) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.shape[0] != num_layers:
        raise BadInput(f"block importance {name} has {x.shape[0]} layers, the model {num_layers}",
                       "recompute block importance for this model")
    if not np.isfinite(x).all():
        raise BadInput(f"block importance {name} has non-finite values", "recompute block importance")
    top = float(x.max()) if x.size else 0.0
    floor = FLOOR_RELATIVE * top if top > 0 else FLOOR_RELATIVE
    x = np.maximum(x, floor)
    return x / x.mean()


def correction_factors(block: Any, *, temperature: float, tau: float, depth_weight: float,
                       num_layers: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-layer multipliers ([L] for attention groups, [L] for MLP channels), or None for identity."""
    att: np.ndarray | None = None
    mlp: np.ndarray | None = None

    def mul(a: np.ndarray | None, f: np.ndarray) -> np.ndarray:
        return f.copy() if a is None else a * f

    if (temperature or tau) and block is None:
        raise BadInput("correction temperature/tau > 0 needs block importance",
                       "measure block importance first, or set [correction] temperature = 0 and tau = 0")
    if temperature:
        att = mul(att, _floored_ratio(block.attention, "attention", num_layers) ** temperature)
        mlp = mul(mlp, _floored_ratio(block.mlp, "mlp", num_layers) ** temperature)
    if tau:
        lay = _floored_ratio(block.layer, "layer", num_layers) ** tau
        att = mul(att, lay)
        mlp = mul(mlp, lay)
    if depth_weight:
        depth = 1.0 + (1.0 - np.arange(num_layers, dtype=np.float64) / num_layers) * depth_weight
        att = mul(att, depth)
        mlp = mul(mlp, depth)
    return att, mlp


def apply_correction(table: pd.DataFrame, block: Any | None, *, temperature: float, tau: float,
                     depth_weight: float, num_layers: int) -> pd.DataFrame:
    """A copy of `table` with importance = raw_importance × corrections and score recomputed.

    `block` needs only `attention`, `mlp`, `layer` sequences of length `num_layers` (a
    `BlockImportance`); it may be None when temperature and tau are both 0.
    """
    out = table.copy()
    att, mlp = correction_factors(block, temperature=temperature, tau=tau, depth_weight=depth_weight,
                                  num_layers=num_layers)
    raw = out["raw_importance"].to_numpy(dtype=np.float64)
    if att is None or mlp is None:
        importance = raw.copy()
    else:
        layer = out["layer_idx"].to_numpy().astype(np.int64)
        factor = np.where(_type_codes(out) == 0, att[layer], mlp[layer])
        importance = raw * factor
    out["importance"] = importance
    out["score"] = _safe_score(importance, out["cost"].to_numpy())
    return out
