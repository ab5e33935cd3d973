"""The global group table: one row per prunable group of every layer, with its importance and cost.

Global pruning ranks attention groups (KV heads with their query heads) and MLP channels of all
layers against each other by score = importance / cost. This module builds that table from an
`ImportanceResult` (only its `attention` [L, kv] and `mlp` [L, I] tensors are read) and the
per-layer group costs of the model (`GroupCosts`, read off the modules through the adapter, so an
already pruned model with uneven layers works too).

Columns and dtypes (chosen so a 70B-shaped table of ~2.3M rows stays around 90 MB):

    layer_idx       int16     decoder layer
    group_type      category  "attention" | "mlp" (codes 0 / 1, in that order)
    group_idx       int32     KV head index or MLP channel index inside the layer
    raw_importance  float64   importance as measured
    importance      float64   after correction, depth weighting, normalization, clipping
    cost            int64     parameters the group removes
    score           float64   importance / cost (what the global ranking sorts by)
    pruned          bool      chosen by `select`

Rows come in canonical order: layer by layer, each layer's attention groups then its MLP channels,
each by index. Everything is built with numpy (no per-row Python).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from prune_core.errors import BadInput, RunFailed

GROUP_TYPES: tuple[str, str] = ("attention", "mlp")
TYPE_DTYPE = pd.CategoricalDtype(categories=list(GROUP_TYPES), ordered=False)
TABLE_COLUMNS: tuple[str, ...] = (
    "layer_idx", "group_type", "group_idx", "raw_importance", "importance", "cost", "score", "pruned",
)


class _HasGroupImportance(Protocol):
    attention: Any  # torch.Tensor | np.ndarray [L, kv]
    mlp: Any  # torch.Tensor | np.ndarray [L, I]


@dataclass
class GroupCosts:
    """Per-layer group counts and the parameters one group of each type removes."""

    attention: list[int]  # [L] params of one attention group in layer l
    mlp: list[int]  # [L] params of one MLP channel in layer l
    n_attention: list[int]  # [L] attention groups (KV heads) in layer l
    n_mlp: list[int]  # [L] MLP channels in layer l
    prunable_total: int  # Σ_l n_attention·attention + n_mlp·mlp

    @property
    def num_layers(self) -> int:
        return len(self.n_attention)

    @classmethod
    def from_model(cls, model: nn.Module, adapter: Any) -> GroupCosts:
        parts = [adapter.parts(model, i) for i in range(adapter.num_layers(model))]
        attention = [p.attention_group_cost() for p in parts]
        mlp = [p.mlp_group_cost() for p in parts]
        n_attention = [p.num_kv_heads for p in parts]
        n_mlp = [p.intermediate_size for p in parts]
        return cls.from_lists(attention, mlp, n_attention, n_mlp)

    @classmethod
    def from_lists(cls, attention: list[int], mlp: list[int], n_attention: list[int],
                   n_mlp: list[int]) -> GroupCosts:
        if not len(attention) == len(mlp) == len(n_attention) == len(n_mlp):
            raise BadInput("group cost lists differ in length", "pass one entry per layer in every list")
        total = sum(int(a) * int(na) + int(m) * int(nm)
                    for a, m, na, nm in zip(attention, mlp, n_attention, n_mlp, strict=True))
        return cls([int(x) for x in attention], [int(x) for x in mlp], [int(x) for x in n_attention],
                   [int(x) for x in n_mlp], total)

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention, "mlp": self.mlp, "n_attention": self.n_attention,
                "n_mlp": self.n_mlp, "prunable_total": self.prunable_total}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupCosts:
        return cls.from_lists(d["attention"], d["mlp"], d["n_attention"], d["n_mlp"])


def _as_2d(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise BadInput(f"importance.{name} must be a 2-D [layers, groups] array, got shape {arr.shape}",
                       "pass the ImportanceResult produced by run_importance")
    return arr


def _type_codes(table: pd.DataFrame) -> np.ndarray:
    """group_type as int8 codes (0 attention, 1 mlp), whatever dtype the column has."""
    col = table["group_type"]
    if isinstance(col.dtype, pd.CategoricalDtype) and list(col.cat.categories) == list(GROUP_TYPES):
        return col.cat.codes.to_numpy(dtype=np.int8)
    values = col.astype(str).to_numpy()
    return np.where(values == "attention", 0, 1).astype(np.int8)


def _safe_score(importance: np.ndarray, cost: np.ndarray) -> np.ndarray:
    return importance / np.maximum(cost, 1).astype(np.float64)


def build_table(result: _HasGroupImportance, costs: GroupCosts) -> pd.DataFrame:
    """One row per group; importance starts equal to raw_importance and `pruned` is all False.

    Layer l reads the first `costs.n_attention[l]` / `costs.n_mlp[l]` entries of its row (the
    importance tensors are rectangular; a model with uneven layers pads the shorter rows).
    """
    att = _as_2d(result.attention, "attention")
    mlp = _as_2d(result.mlp, "mlp")
    num_layers = costs.num_layers
    if att.shape[0] != num_layers or mlp.shape[0] != num_layers:
        raise BadInput(
            f"importance covers {att.shape[0]} (attention) / {mlp.shape[0]} (mlp) layers but the model has "
            f"{num_layers}", "recompute importance for this model")
    n_att = np.asarray(costs.n_attention, dtype=np.int64)
    n_mlp = np.asarray(costs.n_mlp, dtype=np.int64)
    if (n_att > att.shape[1]).any() or (n_mlp > mlp.shape[1]).any():
        raise BadInput(f"importance has {att.shape[1]} attention / {mlp.shape[1]} MLP groups per layer, fewer "
                       "than the model", "recompute importance for this model")

    # Per layer: n_att[l] attention rows then n_mlp[l] MLP rows.
    sizes = np.stack([n_att, n_mlp], axis=1).reshape(-1)  # [2L]: att0, mlp0, att1, mlp1, ...
    n_rows = int(sizes.sum())
    block = np.repeat(np.arange(2 * num_layers, dtype=np.int64), sizes)
    layer = (block // 2).astype(np.int16)
    type_code = (block % 2).astype(np.int8)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    idx = (np.arange(n_rows, dtype=np.int64) - np.repeat(starts, sizes)).astype(np.int32)

    is_att = type_code == 0
    raw = np.empty(n_rows, dtype=np.float64)
    raw[is_att] = att[layer[is_att], idx[is_att]]
    raw[~is_att] = mlp[layer[~is_att], idx[~is_att]]
    bad = int((~np.isfinite(raw)).sum())
    if bad:
        raise RunFailed(f"importance has {bad} non-finite values (NaN or Inf)",
                        "recompute importance (try float32, a smaller learning signal or fewer tokens)")

    cost_att = np.asarray(costs.attention, dtype=np.int64)
    cost_mlp = np.asarray(costs.mlp, dtype=np.int64)
    cost = np.where(is_att, cost_att[layer], cost_mlp[layer]).astype(np.int64)

    table = pd.DataFrame({
        "layer_idx": layer,
        "group_type": pd.Categorical.from_codes(type_code, dtype=TYPE_DTYPE),
        "group_idx": idx,
        "raw_importance": raw,
        "importance": raw.copy(),
        "cost": cost,
        "score": _safe_score(raw, cost),
        "pruned": np.zeros(n_rows, dtype=bool),
    })
    return table
