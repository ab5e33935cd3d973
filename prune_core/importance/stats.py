"""Live per-layer statistics of the importance pass: cheap reductions per tensor, combined per block.

For every scored tensor of a batch (a parameter's gradient, or a linear layer's input activation for
wanda) we compute five reductions on the tensor's device — Σ|x|, Σx, Σx², max|x|, min|x| — and write
them into one row of a small per-batch buffer. After the batch the buffer goes to the CPU with a
single `.tolist()`, and rows are combined per layer and block ("attention" = q,k,v,o; "mlp" =
gate,up,down; "layer" = both), using the element counts:

    mean = Σ|x| / n      std = sqrt(Σx²/n − (Σx/n)²)      norm = sqrt(Σx²)      max, min of |x|

Across batches (ImportanceResult.stats) mean/std/norm are averaged and max/min take the max/min.
A gradient pass reads a block of each weight's rows (`stats_sample`) every `stats_every`-th batch
(accumulate.py), so these are estimates from that sample: max and min are those of the rows read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from prune_core.events import LayerStats

BLOCKS = ("attention", "mlp", "layer")
STATS = ("mean", "std", "norm", "max", "min")
ROW_WIDTH = 5  # Σ|x|, Σx, Σx², max|x|, min|x|
SUM_SQ = 2  # column of Σx² (non-finite iff the tensor holds NaN/Inf or its squares overflow)


def fill_row(flat: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> None:
    """Write Σ|x|, Σx, Σx², max|x|, min|x| of the 1-D tensor `flat` into `out` (no sync, no big allocation).

    `scratch` is a reusable buffer of at least flat.numel() elements and flat's dtype (holds |x|).
    """
    if flat.numel() == 0:
        out.zero_()
        return
    a = torch.abs(flat, out=scratch[: flat.numel()])
    # amax + amin are each as fast as a sum; aminmax is slower than both together on CPU
    torch.stack((a.sum(), flat.sum(), torch.dot(flat, flat), a.amax(), a.amin()), out=out)


class BlockStats:
    """Combines per-tensor rows into per-layer, per-block statistics.

    `owners[i]` = (layer, block) of row i, block "attention" or "mlp".
    """

    def __init__(self, owners: Sequence[tuple[int, str]], num_layers: int) -> None:
        self.owners = list(owners)
        self.num_layers = num_layers

    def combine(self, rows: Sequence[Sequence[float]], counts: Sequence[int]) -> LayerStats:
        acc = {
            (layer, block): [0.0, 0.0, 0.0, -math.inf, math.inf, 0]
            for layer in range(self.num_layers)
            for block in BLOCKS
        }
        for (layer, block), row, n in zip(self.owners, rows, counts, strict=True):
            if n == 0:
                continue
            for key in ((layer, block), (layer, "layer")):
                a = acc[key]
                a[0] += row[0]
                a[1] += row[1]
                a[2] += row[2]
                a[3] = max(a[3], row[3])
                a[4] = min(a[4], row[4])
                a[5] += n
        out: LayerStats = {block: {s: [0.0] * self.num_layers for s in STATS} for block in BLOCKS}
        for (layer, block), (s_abs, s, s_sq, hi, lo, n) in acc.items():
            if n == 0:
                continue
            mean = s / n
            values = {
                "mean": s_abs / n,
                "std": math.sqrt(max(s_sq / n - mean * mean, 0.0)),
                "norm": math.sqrt(s_sq),
                "max": hi,
                "min": lo,
            }
            for name, value in values.items():
                out[block][name][layer] = value
        return out


def aggregate(batch_stats: Sequence[LayerStats]) -> LayerStats:
    """Combine per-batch stats: mean/std/norm averaged over batches, max = max, min = min."""
    if not batch_stats:
        return {}
    out: LayerStats = {}
    for block, per_stat in batch_stats[0].items():
        out[block] = {}
        for name in per_stat:
            columns = zip(*(b[block][name] for b in batch_stats), strict=True)
            if name == "max":
                out[block][name] = [max(c) for c in columns]
            elif name == "min":
                out[block][name] = [min(c) for c in columns]
            else:
                out[block][name] = [sum(c) / len(batch_stats) for c in columns]
    return out
