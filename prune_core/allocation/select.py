"""Global selection: which groups to remove so that `ratio` of the prunable parameters go.

All groups of all layers are ranked together by ascending score (importance / cost) and removed
in that order until the removed cost reaches ratio × prunable parameters. The last group may
overshoot the target by at most its own cost; the achieved ratio is reported.

Ranking order (total and deterministic, also for zero / negative / tied normalized scores):
score ascending, then raw score (raw_importance / cost) ascending, then (layer, type, index) with
attention before MLP. -0.0 counts as 0.0.

Constraints are enforced while ranking, not patched afterwards. A *block* is one layer's attention
groups or its MLP channels, with n groups:
- cap   = floor(max_rate' × n) groups at most, max_rate' = min(max_rate, early_max_rate) for the
  first `early_layers` layers, else max_rate;
- floor = ceil(min_rate × n) groups at least, limited to the cap (the cap wins when both cannot hold);
- protected layers: cap = floor = 0 (never pruned, and min_rate does not apply).
(A 1e-9 slack absorbs float error in rate × n, so 0.29 × 100 gives 29, not 28.)
`blocks = "mlp"` (or "attention") caps the other block type at 0, like a protected layer.
`mode = "hybrid"` takes the attention groups the global ranking removes (heads compete with channels
across layers) and spends the rest of the budget on MLP channels as `uniform` does (the same rate in
every prunable MLP block). Measured on smollm2-135m: no better than `uniform` at 20 %, and the heads
removed cost 27 % in-domain at 40 % (BENCHMARKS.md, "Seventh screening").
`mode = "uniform"` (LLM-Pruner's budget) replaces the global ranking: every prunable block removes
the same fraction of its groups (⌊r·n⌋, plus one for the largest remainders until the target is
met; blocks of the same size take that one more together, so they keep one width — without protected
layers the model then exports to a plain Hugging Face config), its lowest-ranked ones; floors and caps still bound each block. With `depth_ramp` = d > 0 the
rate rises with depth instead (SlimGPT's increasing per-layer ratios: errors of early layers travel
through all later ones): block b of the i-th of the m prunable layers gets r·w_b, with
w_b = 1 + d·(2i/(m − 1) − 1) (from 1 − d to 1 + d, mean 1), r the largest common factor whose removed
cost stays within the target (bisection), then the largest remainders as above. With `global_share` = α > 0
each block's rate is pulled toward the rate the global ranking gives it: w_b = (1 − α)·r₀ + α·g_b (r₀ the
common rate, g_b the global ranking's share of the block; times the depth weights), scaled as above to
meet the target — α = 1 gives about the global ranking's per-block counts, each block still losing its
lowest-ranked groups. Measured: the global shape wins at 20 % and loses at 40 %.
Both apply to the block's lowest-ranked groups first: the floor groups of every block are removed
up front, then the remaining allowed groups (rank inside their block < cap) are taken in global
order. The set removed from a block is therefore always a prefix of its own ranking.

If the floors alone remove more than the target, all floor groups are still removed (the result
overshoots; the message says by how much). If the caps make the target unreachable, everything
allowed is removed, `reachable` is False and the message gives the numbers. A block may be pruned
to 100 % (surgery replaces it).

Everything is numpy: one fast argsort (plus a lexsort of tied runs only), a stable radix argsort
of block ids for ranks inside blocks, and a cumulative sum: about 0.1 s for 2.3M groups (bench).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from prune_core.allocation.table import _type_codes
from prune_core.errors import BadInput

_SLACK = 1e-9


@dataclass
class Selection:
    pruned: np.ndarray  # bool per table row
    target_ratio: float
    target_parameters: int  # ceil(ratio × prunable_parameters)
    removed_parameters: int
    prunable_parameters: int
    achieved_ratio: float
    reachable: bool
    message: str
    max_parameters: int  # the most the constraints allow
    floor_parameters: int  # what min_rate forces


def rank_order(table: pd.DataFrame) -> np.ndarray:
    """Row positions in global ranking order (least important first). See the module docstring."""
    cost = np.maximum(table["cost"].to_numpy(), 1).astype(np.float64)
    score = table["score"].to_numpy(dtype=np.float64) + 0.0  # -0.0 -> 0.0
    order = np.argsort(score)
    ss = score[order]
    tie = ss[1:] == ss[:-1]
    if tie.any():
        in_run = np.zeros(len(ss), dtype=bool)
        in_run[:-1] |= tie
        in_run[1:] |= tie
        pos = np.flatnonzero(in_run)
        sub = order[pos]
        raw_score = table["raw_importance"].to_numpy(dtype=np.float64)[sub] / cost[sub] + 0.0
        canon = ((table["layer_idx"].to_numpy().astype(np.int64)[sub] << 33)
                 | (_type_codes(table).astype(np.int64)[sub] << 32)
                 | table["group_idx"].to_numpy().astype(np.int64)[sub])
        order[pos] = sub[np.lexsort((canon, raw_score, ss[pos]))]
    return order


def block_limits(table: pd.DataFrame, *, min_rate: float, max_rate: float, protect_layers: Iterable[int],
                 early_layers: int, early_max_rate: float, blocks: str = "both"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(block id per row, floor per block, cap per block); block id = 2·layer + type (0 attention, 1 MLP)."""
    layer = table["layer_idx"].to_numpy().astype(np.int64)
    num_layers = int(layer.max()) + 1 if len(layer) else 0
    block = 2 * layer + _type_codes(table).astype(np.int64)
    n = np.bincount(block, minlength=2 * num_layers).astype(np.float64)
    block_layer = np.arange(2 * num_layers) // 2
    rate_cap = np.where(block_layer < early_layers, min(max_rate, early_max_rate), max_rate)
    cap = np.floor(rate_cap * n + _SLACK).astype(np.int64)
    floor = np.minimum(np.ceil(min_rate * n - _SLACK).astype(np.int64), cap)
    protected = np.isin(block_layer, np.fromiter(protect_layers, dtype=np.int64))
    if blocks != "both":
        if blocks not in ("mlp", "attention"):
            raise BadInput(f"unknown blocks {blocks!r}", "use both, mlp or attention")
        protected |= (np.arange(2 * num_layers) % 2) == (0 if blocks == "mlp" else 1)
    cap[protected] = 0
    floor[protected] = 0
    return block, np.maximum(floor, 0), np.maximum(cap, 0)


def uniform_counts(n: np.ndarray, cost: np.ndarray, floor: np.ndarray, cap: np.ndarray, target: int,
                   weight: np.ndarray | None = None) -> np.ndarray:
    """Groups to remove per block for one common rate r over the prunable blocks (cap > 0): ⌊r·n⌋ each
    (⌊r·w·n⌋ with per-block weights `weight`, r then the largest factor that stays within `target`),
    then one more group in the blocks with the largest remainders until the removed cost reaches
    `target`; never below a block's floor nor above its cap."""
    live = cap > 0
    total = float((n * cost)[live].sum())
    if total <= 0:
        return floor.copy()

    def counts(exact: np.ndarray) -> np.ndarray:
        k = np.clip(np.floor(exact + _SLACK).astype(np.int64), floor, cap)
        k[~live] = floor[~live]
        return k

    if weight is None:
        exact = min(target / total, 1.0) * n
    else:
        lo, hi = 0.0, 1.0 / max(float(weight[live].min()), 1e-6)
        for _ in range(60):  # the removed cost grows with r: the largest r within the target
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if int((counts(mid * weight * n) * cost).sum()) <= target else (lo, mid)
        exact = np.minimum(lo * weight * n, n)
    k = counts(exact)
    short = target - int((k * cost).sum())
    if short > 0:
        remainder = np.where(live & (k < cap), exact - np.floor(exact + _SLACK), -1.0)
        for b in np.argsort(-remainder, kind="stable"):
            if short <= 0 or remainder[b] < 0:
                break
            if weight is None:  # blocks of one size stay one width (an exportable model): they take the extra
                take = (n == n[b]) & (cost == cost[b]) & (k == k[b]) & (remainder >= 0)  # group together
            else:
                take = np.arange(len(k)) == b
            k[take] += 1
            short -= int(cost[take].sum())
            remainder[take] = -1.0
    return k


def depth_weights(cap: np.ndarray, ramp: float) -> np.ndarray:
    """Per block (id 2·layer + type): 1 + ramp·(2i/(m − 1) − 1) for the i-th of the m layers with a
    prunable block (cap > 0), 1 elsewhere and when only one layer is prunable."""
    layers = np.unique(np.flatnonzero(cap > 0) // 2)
    weight = np.ones(len(cap), dtype=np.float64)
    if len(layers) < 2:
        return weight
    position = np.full(len(cap) // 2 + 1, -1.0)
    position[layers] = np.arange(len(layers)) / (len(layers) - 1)
    block_pos = position[np.arange(len(cap)) // 2]
    return np.where(block_pos >= 0, 1.0 + ramp * (2.0 * block_pos - 1.0), 1.0)


def select(table: pd.DataFrame, *, ratio: float, prunable_total: int, min_rate: float = 0.0,
           max_rate: float = 1.0, protect_layers: Iterable[int] = (), early_layers: int = 0,
           early_max_rate: float = 1.0, blocks: str = "both", mode: str = "global",
           depth_ramp: float = 0.0, global_share: float = 0.0) -> Selection:
    """Choose the groups to prune (see the module docstring); the table is not modified.

    `blocks` = "mlp" / "attention" prunes only that block type; `mode` = "uniform" gives every
    prunable block the same rate (its lowest-ranked groups), instead of one global ranking; "hybrid"
    ranks attention globally and gives the MLP blocks one rate; `depth_ramp` makes that rate rise with
    depth (uniform and hybrid).
    """
    if mode not in ("global", "uniform", "hybrid"):
        raise BadInput(f"unknown allocation {mode!r}", "use global, uniform or hybrid")
    if not 0.0 <= depth_ramp < 1.0:
        raise BadInput(f"depth_ramp {depth_ramp} is outside [0, 1)", "use e.g. 0.5: rates from 0.5× to 1.5× the mean")
    if not 0.0 <= global_share <= 1.0:
        raise BadInput(f"global_share {global_share} is outside [0, 1]", "use e.g. 0.5: halfway to the global rates")
    if not 0.0 <= ratio <= 1.0:
        raise BadInput(f"ratio {ratio} is outside [0, 1]", "use a fraction such as 0.2")
    if min_rate > max_rate:
        raise BadInput(f"min_rate ({min_rate}) exceeds max_rate ({max_rate})", "lower min_rate or raise max_rate")
    protect = sorted({int(i) for i in protect_layers})
    n_rows = len(table)
    total = int(prunable_total)
    target = math.ceil(round(ratio * total, 6))

    order = rank_order(table)
    block, floor, cap = block_limits(table, min_rate=min_rate, max_rate=max_rate, protect_layers=protect,
                                     early_layers=early_layers, early_max_rate=early_max_rate, blocks=blocks)
    # Rank of each position (in global order) inside its block: stable sort by block id.
    bs = block[order].astype(np.int32 if len(cap) > 32767 else np.int16)
    o2 = np.argsort(bs, kind="stable")
    counts = np.bincount(bs, minlength=len(cap))
    starts = np.cumsum(counts) - counts
    rank = np.empty(n_rows, dtype=np.int64)
    rank[o2] = np.arange(n_rows, dtype=np.int64) - starts[bs[o2]]

    cost_pos = table["cost"].to_numpy().astype(np.int64)[order]
    rate_floor_cost = int(cost_pos[rank < floor[bs]].sum())  # what min_rate alone forces
    if mode in ("uniform", "hybrid"):
        n_block = counts.astype(np.int64)
        cost_block = np.zeros(len(cap), dtype=np.int64)
        cost_block[bs] = cost_pos  # a block's groups share one cost
        weight = depth_weights(cap, depth_ramp) if depth_ramp > 0 else None
        taken = np.zeros(len(cap), dtype=np.int64)  # groups the global ranking removes per block, when needed
        if mode == "hybrid" or global_share > 0:
            ranked = select(table, ratio=ratio, prunable_total=total, min_rate=min_rate, max_rate=max_rate,
                            protect_layers=protect, early_layers=early_layers, early_max_rate=early_max_rate,
                            blocks=blocks)
            taken = np.bincount(block[ranked.pruned], minlength=len(cap))
        if mode == "uniform" and global_share > 0:  # rates pulled toward the global ranking's per-block rates
            live = cap > 0
            common = target / max(float((n_block * cost_block)[live].sum()), 1.0)
            own = taken / np.maximum(n_block, 1)
            blend = (1.0 - global_share) * common + global_share * own
            weight = blend * (weight if weight is not None else 1.0) / max(common, 1e-12)
        if mode == "uniform":
            floor = uniform_counts(n_block, cost_block, floor, cap, target, weight)
        else:  # attention blocks keep what the global ranking removes; MLP blocks share the rest uniformly
            attention = np.arange(len(cap)) % 2 == 0
            att_cost = int((taken * cost_block)[attention].sum())
            mlp = uniform_counts(n_block, cost_block, np.where(attention, 0, floor), np.where(attention, 0, cap),
                                 max(target - att_cost, 0), weight)
            floor = np.where(attention, taken, mlp)
    forced = rank < floor[bs]
    allowed = rank < cap[bs]
    eligible = allowed & ~forced
    floor_cost = int(cost_pos[forced].sum())
    max_cost = int(cost_pos[allowed].sum())

    chosen = forced.copy()
    reachable = True
    if floor_cost < target:
        cum = np.cumsum(np.where(eligible, cost_pos, 0))
        need = target - floor_cost
        k = int(np.searchsorted(cum, need, side="left")) if n_rows else 0
        if k < n_rows:
            chosen |= eligible & (np.arange(n_rows) <= k)
        else:
            chosen |= eligible
            reachable = False

    pruned = np.zeros(n_rows, dtype=bool)
    pruned[order[chosen]] = True
    removed = int(cost_pos[chosen].sum())
    achieved = removed / total if total else 0.0

    if not reachable:
        limits = [f"max_rate {max_rate:g}"]
        if early_layers and early_max_rate < max_rate:
            limits.append(f"early_max_rate {early_max_rate:g} for the first {early_layers} layers")
        if protect:
            limits.append(f"protected layers {protect}")
        message = (f"ratio {ratio:.2%} needs {target:,} of {total:,} prunable parameters, but the constraints "
                   f"({', '.join(limits)}) allow at most {max_cost:,} ({max_cost / total if total else 0:.2%}); "
                   f"pruned that much instead")
    elif rate_floor_cost >= target and rate_floor_cost > 0:
        message = (f"min_rate {min_rate:g} alone removes {rate_floor_cost:,} parameters "
                   f"({achieved:.2%}), above the target {ratio:.2%} ({target:,})")
    else:
        message = (f"removed {removed:,} of {total:,} prunable parameters ({achieved:.2%}, "
                   f"target {ratio:.2%})")
    return Selection(pruned=pruned, target_ratio=float(ratio), target_parameters=target,
                     removed_parameters=removed, prunable_parameters=total, achieved_ratio=achieved,
                     reachable=reachable, message=message, max_parameters=max_cost,
                     floor_parameters=rate_floor_cost)
