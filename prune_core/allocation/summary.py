"""Per-layer summary of a selection, the mask hash, and the CSV / text writers for the results folder.

`layer_summary` gives one row per layer: layer_idx, attention_groups, attention_pruned,
attention_rate, mlp_groups, mlp_pruned, mlp_rate, params_before, params_after, where the params
columns count the layer's *prunable* parameters (attention + MLP groups; norms and the o_proj /
down_proj biases are not included).

`mask_sha256` identifies a selection independently of table order. Byte format: the pruned groups
sorted by (layer, type, index) with type 0 = attention, 1 = mlp, each written as three little-endian
int32 values (layer, type, index) = 12 bytes per group, concatenated; sha256 of those bytes, hex.
An empty selection hashes the empty byte string.

All files are written atomically (prune_core.atomic).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from prune_core import atomic
from prune_core.allocation.table import _type_codes

SUMMARY_COLUMNS: tuple[str, ...] = (
    "layer_idx", "attention_groups", "attention_pruned", "attention_rate",
    "mlp_groups", "mlp_pruned", "mlp_rate", "params_before", "params_after",
)
TABLE_CSV = "global_group_table.csv"
SUMMARY_CSV = "pruning_summary_by_layer.csv"
SUMMARY_TXT = "pruning_summary_by_layer.txt"


def layer_summary(table: pd.DataFrame, num_layers: int | None = None) -> pd.DataFrame:
    layer = table["layer_idx"].to_numpy().astype(np.int64)
    num_layers = int(num_layers if num_layers is not None else (layer.max() + 1 if len(layer) else 0))
    is_mlp = _type_codes(table).astype(bool)
    pruned = table["pruned"].to_numpy(dtype=bool)
    cost = table["cost"].to_numpy().astype(np.float64)

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(layer[mask], minlength=num_layers).astype(np.int64)

    def params(mask: np.ndarray) -> np.ndarray:
        return np.rint(np.bincount(layer[mask], weights=cost[mask], minlength=num_layers)).astype(np.int64)

    att_n, mlp_n = count(~is_mlp), count(is_mlp)
    att_p, mlp_p = count(~is_mlp & pruned), count(is_mlp & pruned)
    before = params(np.ones(len(layer), dtype=bool))
    after = before - params(pruned)
    with np.errstate(invalid="ignore", divide="ignore"):
        att_rate = np.where(att_n > 0, att_p / np.maximum(att_n, 1), 0.0)
        mlp_rate = np.where(mlp_n > 0, mlp_p / np.maximum(mlp_n, 1), 0.0)
    return pd.DataFrame({
        "layer_idx": np.arange(num_layers, dtype=np.int64),
        "attention_groups": att_n, "attention_pruned": att_p, "attention_rate": att_rate,
        "mlp_groups": mlp_n, "mlp_pruned": mlp_p, "mlp_rate": mlp_rate,
        "params_before": before, "params_after": after,
    })


def pruned_triples(table: pd.DataFrame) -> np.ndarray:
    """[k, 3] int64 (layer, type, index) of the pruned groups, sorted."""
    mask = table["pruned"].to_numpy(dtype=bool)
    triples = np.stack([
        table["layer_idx"].to_numpy().astype(np.int64)[mask],
        _type_codes(table).astype(np.int64)[mask],
        table["group_idx"].to_numpy().astype(np.int64)[mask],
    ], axis=1)
    order = np.lexsort((triples[:, 2], triples[:, 1], triples[:, 0]))
    return triples[order]


def hash_triples(triples: np.ndarray) -> str:
    """sha256 of sorted (layer, type code, index) triples as little-endian int32 (the mask hash format)."""
    data = np.ascontiguousarray(np.asarray(triples).reshape(-1, 3).astype("<i4"))
    return hashlib.sha256(data.tobytes()).hexdigest()


def mask_sha256(table: pd.DataFrame) -> str:
    return hash_triples(pruned_triples(table))


def pruned_indices(table: pd.DataFrame, num_layers: int | None = None) -> dict[int, dict[str, list[int]]]:
    """layer -> {"attention": [...], "mlp": [...]} of pruned group indices (every layer present)."""
    triples = pruned_triples(table)
    layer_col = table["layer_idx"].to_numpy()
    n = int(num_layers if num_layers is not None else (int(layer_col.max()) + 1 if len(layer_col) else 0))
    out: dict[int, dict[str, list[int]]] = {i: {"attention": [], "mlp": []} for i in range(n)}
    if len(triples):
        bounds = np.flatnonzero(np.diff(triples[:, 0] * 2 + triples[:, 1])) + 1
        for chunk in np.split(triples, bounds):
            kind = "attention" if chunk[0, 1] == 0 else "mlp"
            out[int(chunk[0, 0])][kind] = chunk[:, 2].tolist()
    return out


def write_table_csv(table: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    atomic.write_with(path, lambda tmp: table.to_csv(tmp, index=False))
    return path


def format_summary(summary: pd.DataFrame) -> str:
    header = f"{'layer':>5}  {'attention pruned':>16}  {'MLP pruned':>10}  {'params before':>14}  {'params after':>14}"
    lines = [header, "-" * len(header)]
    for row in summary.itertuples(index=False):  # one line per layer (tens of rows)
        lines.append(f"{row.layer_idx:>5}  {row.attention_rate * 100:>15.1f}%  {row.mlp_rate * 100:>9.1f}%  "
                     f"{row.params_before:>14,}  {row.params_after:>14,}")
    lines.append("-" * len(header))
    att_n, att_p = int(summary["attention_groups"].sum()), int(summary["attention_pruned"].sum())
    mlp_n, mlp_p = int(summary["mlp_groups"].sum()), int(summary["mlp_pruned"].sum())
    before, after = int(summary["params_before"].sum()), int(summary["params_after"].sum())
    att_rate = att_p / att_n * 100 if att_n else 0.0
    mlp_rate = mlp_p / mlp_n * 100 if mlp_n else 0.0
    lines.append(f"{'total':>5}  {att_rate:>15.1f}%  {mlp_rate:>9.1f}%  {before:>14,}  {after:>14,}")
    removed = before - after
    lines.append(f"removed {removed:,} of {before:,} prunable parameters "
                 f"({removed / before * 100 if before else 0.0:.2f} %); "
                 f"{att_p}/{att_n} attention groups, {mlp_p}/{mlp_n} MLP channels")
    return "\n".join(lines) + "\n"


def write_summary(summary: pd.DataFrame, folder: str | Path) -> tuple[Path, Path]:
    """Write pruning_summary_by_layer.csv and .txt into `folder` (the results' analysis/ folder)."""
    folder = Path(folder)
    csv_path, txt_path = folder / SUMMARY_CSV, folder / SUMMARY_TXT
    atomic.write_with(csv_path, lambda tmp: summary.to_csv(tmp, index=False))
    atomic.write_text(txt_path, format_summary(summary))
    return csv_path, txt_path
