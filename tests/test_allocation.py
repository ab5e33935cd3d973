"""Allocation: group table, correction, normalization / clipping, constrained global selection, summary."""

from __future__ import annotations

import hashlib
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prune_core.allocation import (
    Allocation,
    GroupCosts,
    Selection,
    allocate,
    apply_correction,
    build_table,
    layer_summary,
    mask_sha256,
    normalize,
    select,
    write_summary,
    write_table_csv,
)
from prune_core.allocation.select import block_limits, rank_order
from prune_core.errors import BadInput, RunFailed
from sessions.schema import Session

# ---------------------------------------------------------------- helpers


def make_result(att: list[list[float]], mlp: list[list[float]]) -> SimpleNamespace:
    return SimpleNamespace(attention=torch.tensor(att, dtype=torch.float64),
                           mlp=torch.tensor(mlp, dtype=torch.float64))


def hand_table() -> tuple[pd.DataFrame, GroupCosts]:
    """2 layers; layer 0: attention [1, 3], mlp [2, 4, 6]; layer 1: attention [5, 5], mlp [0, 10, 20]."""
    res = make_result([[1, 3], [5, 5]], [[2, 4, 6], [0, 10, 20]])
    costs = GroupCosts.from_lists([10, 10], [2, 2], [2, 2], [3, 3])
    return build_table(res, costs), costs


def values(table: pd.DataFrame, layer: int, kind: str) -> np.ndarray:
    sel = (table["layer_idx"] == layer) & (table["group_type"] == kind)
    return table.loc[sel, "importance"].to_numpy()


def session(**pruning: object) -> Session:
    return Session.model_validate({"pruning": pruning})


# ---------------------------------------------------------------- table


def test_build_table_layout_and_dtypes() -> None:
    table, costs = hand_table()
    assert list(table.columns) == ["layer_idx", "group_type", "group_idx", "raw_importance", "importance",
                                   "cost", "score", "pruned"]
    assert len(table) == 10
    assert table["group_type"].dtype == "category"
    assert table["layer_idx"].dtype == np.int16 and table["group_idx"].dtype == np.int32
    assert table["group_type"].tolist() == ["attention"] * 2 + ["mlp"] * 3 + ["attention"] * 2 + ["mlp"] * 3
    assert table["group_idx"].tolist() == [0, 1, 0, 1, 2, 0, 1, 0, 1, 2]
    assert table["raw_importance"].tolist() == [1, 3, 2, 4, 6, 5, 5, 0, 10, 20]
    assert table["cost"].tolist() == [10, 10, 2, 2, 2] * 2
    np.testing.assert_array_equal(table["score"], table["importance"] / table["cost"])
    assert not table["pruned"].any()
    assert int(table["cost"].sum()) == costs.prunable_total == 2 * (2 * 10 + 3 * 2)


def test_build_table_uneven_layers_and_nan() -> None:
    res = make_result([[1, 2], [3, 0]], [[1, 1, 1], [2, 2, 0]])
    costs = GroupCosts.from_lists([10, 10], [2, 2], [2, 1], [3, 2])
    table = build_table(res, costs)
    assert len(table) == 2 + 3 + 1 + 2
    with pytest.raises(RunFailed):
        build_table(make_result([[1, float("nan")]], [[1.0]]), GroupCosts.from_lists([1], [1], [2], [1]))
    with pytest.raises(BadInput):
        build_table(make_result([[1, 2]], [[1.0]]), GroupCosts.from_lists([1, 1], [1, 1], [2, 2], [1, 1]))


# ---------------------------------------------------------------- correction


def test_correction_identity_is_bitwise() -> None:
    rng = np.random.default_rng(0)
    res = SimpleNamespace(attention=torch.from_numpy(rng.random((3, 4)) * 1e-7),
                          mlp=torch.from_numpy(rng.random((3, 16)) * 1e3))
    table = build_table(res, GroupCosts.from_lists([7] * 3, [3] * 3, [4] * 3, [16] * 3))
    block = SimpleNamespace(attention=[0.1, 0.3, 0.7], mlp=[1.1, 0.2, 0.3], layer=[2.0, 3.0, 0.5])
    out = apply_correction(table, block, temperature=0.0, tau=0.0, depth_weight=0.0, num_layers=3)
    assert np.array_equal(out["importance"].to_numpy(), table["raw_importance"].to_numpy())
    out = apply_correction(table, None, temperature=0.0, tau=0.0, depth_weight=0.0, num_layers=3)
    assert np.array_equal(out["importance"].to_numpy(), table["raw_importance"].to_numpy())
    with pytest.raises(BadInput):
        apply_correction(table, None, temperature=1.0, tau=0.0, depth_weight=0.0, num_layers=3)


def test_correction_hand_example() -> None:
    table, _ = hand_table()
    # attention b = [1, 3] (mean 2), mlp b = [2, 2] (mean 2), layer = [1, 4] (mean 2.5)
    block = SimpleNamespace(attention=[1.0, 3.0], mlp=[2.0, 2.0], layer=[1.0, 4.0])
    out = apply_correction(table, block, temperature=2.0, tau=0.5, depth_weight=0.0, num_layers=2)
    att0 = (1 / 2) ** 2 * (1 / 2.5) ** 0.5
    att1 = (3 / 2) ** 2 * (4 / 2.5) ** 0.5
    mlp0 = 1.0 * (1 / 2.5) ** 0.5
    mlp1 = 1.0 * (4 / 2.5) ** 0.5
    np.testing.assert_allclose(values(out, 0, "attention"), np.array([1, 3]) * att0, rtol=1e-12)
    np.testing.assert_allclose(values(out, 1, "attention"), np.array([5, 5]) * att1, rtol=1e-12)
    np.testing.assert_allclose(values(out, 0, "mlp"), np.array([2, 4, 6]) * mlp0, rtol=1e-12)
    np.testing.assert_allclose(values(out, 1, "mlp"), np.array([0, 10, 20]) * mlp1, rtol=1e-12)
    np.testing.assert_allclose(out["score"], out["importance"] / out["cost"])
    np.testing.assert_array_equal(out["cost"], table["cost"])


def test_correction_floor_for_negative_block_importance() -> None:
    table, _ = hand_table()
    # attention loss increases [-1, 2]: -1 is floored at 1e-8 × 2 = 2e-8; mean = (2e-8 + 2) / 2
    block = SimpleNamespace(attention=[-1.0, 2.0], mlp=[0.0, 0.0], layer=[1.0, 1.0])
    out = apply_correction(table, block, temperature=1.0, tau=0.0, depth_weight=0.0, num_layers=2)
    mean = (2e-8 + 2.0) / 2
    np.testing.assert_allclose(values(out, 0, "attention"), np.array([1, 3]) * 2e-8 / mean, rtol=1e-9)
    np.testing.assert_allclose(values(out, 1, "attention"), np.array([5, 5]) * 2.0 / mean, rtol=1e-9)
    # no positive mlp value: all floored to the same value, ratio 1
    np.testing.assert_allclose(values(out, 1, "mlp"), [0, 10, 20])
    assert np.isfinite(out["importance"]).all()


def test_depth_weighting_values() -> None:
    res = make_result([[1.0]] * 4, [[1.0, 1.0]] * 4)
    table = build_table(res, GroupCosts.from_lists([1] * 4, [1] * 4, [1] * 4, [2] * 4))
    out = apply_correction(table, None, temperature=0.0, tau=0.0, depth_weight=1.0, num_layers=4)
    for layer, factor in enumerate([2.0, 1.75, 1.5, 1.25]):  # 1 + (1 - l/L) × 1
        np.testing.assert_allclose(values(out, layer, "attention"), [factor])
        np.testing.assert_allclose(values(out, layer, "mlp"), [factor, factor])
    out = apply_correction(table, None, temperature=0.0, tau=0.0, depth_weight=0.4, num_layers=4)
    np.testing.assert_allclose(values(out, 2, "mlp"), [1 + 0.5 * 0.4] * 2)


# ---------------------------------------------------------------- normalization


def test_minmax_block_and_layer() -> None:
    table, _ = hand_table()
    out = normalize(table, level="block", method="minmax", clip=[])
    np.testing.assert_allclose(values(out, 0, "attention"), [0, 1])
    np.testing.assert_allclose(values(out, 0, "mlp"), [0, 0.5, 1])
    np.testing.assert_allclose(values(out, 1, "attention"), [0, 0])  # zero range -> 0.0
    np.testing.assert_allclose(values(out, 1, "mlp"), [0, 0.5, 1])
    out = normalize(table, level="layer", method="minmax", clip=[])
    np.testing.assert_allclose(values(out, 0, "attention"), [0, 0.4])  # layer 0: min 1, max 6
    np.testing.assert_allclose(values(out, 0, "mlp"), [0.2, 0.6, 1])
    np.testing.assert_allclose(values(out, 1, "attention"), [0.25, 0.25])  # layer 1: min 0, max 20
    np.testing.assert_allclose(out["score"], out["importance"] / out["cost"])


def test_zscore_population_std() -> None:
    table, _ = hand_table()
    out = normalize(table, level="block", method="zscore", clip=[])
    np.testing.assert_allclose(values(out, 0, "attention"), [-1, 1])  # mean 2, std 1
    s = math.sqrt(8 / 3)  # mlp [2, 4, 6]: population std
    np.testing.assert_allclose(values(out, 0, "mlp"), [-2 / s, 0, 2 / s])
    np.testing.assert_allclose(values(out, 1, "attention"), [0, 0])
    out = normalize(table, level="layer", method="zscore", clip=[])
    x = np.array([1, 3, 2, 4, 6], dtype=float)
    np.testing.assert_allclose(np.concatenate([values(out, 0, "attention"), values(out, 0, "mlp")]),
                               (x - x.mean()) / x.std(ddof=0))


def test_log_and_sqrt() -> None:
    table, _ = hand_table()
    out = normalize(table, level="block", method="log", clip=[])
    np.testing.assert_allclose(values(out, 0, "attention"), np.log(np.array([1, 3]) - 1 + 1))
    np.testing.assert_allclose(values(out, 1, "mlp"), np.log(np.array([0, 10, 20]) + 1))
    out = normalize(table, level="layer", method="log", clip=[])
    np.testing.assert_allclose(values(out, 0, "mlp"), np.log(np.array([2, 4, 6]) - 1 + 1))
    out = normalize(table, level="layer", method="sqrt", clip=[])
    np.testing.assert_allclose(values(out, 1, "mlp"), np.sqrt([0, 10, 20]))
    neg = table.copy()
    neg["importance"] = neg["importance"] - 3.0
    out = normalize(neg, level="block", method="sqrt", clip=[])
    np.testing.assert_allclose(values(out, 0, "attention"), [0, 0])  # [-2, 0] -> clamped at 0
    np.testing.assert_allclose(values(out, 1, "mlp"), [0, math.sqrt(7), math.sqrt(17)])


def test_level_none_is_off_but_clip_is_global() -> None:
    table, _ = hand_table()
    for method in ("log", "minmax", "zscore", "sqrt"):
        out = normalize(table, level="none", method=method, clip=[])
        np.testing.assert_array_equal(out["importance"], table["importance"])
    out = normalize(table, level="none", method="minmax", clip=[0, 50])
    # all ten values sorted [0,1,2,3,4,5,5,6,10,20]: median 4.5
    np.testing.assert_allclose(out["importance"], np.minimum(table["raw_importance"], 4.5))
    out = normalize(table, level="none", method="log", clip=[10, 90])
    lo, hi = 0.9, 11.0  # linear interpolation: 0 + 0.9 × (1 - 0), 10 + 0.1 × (20 - 10)
    np.testing.assert_allclose(out["importance"], np.clip(table["raw_importance"], lo, hi))


def test_clip_per_unit_before_normalizing() -> None:
    table, _ = hand_table()
    out = normalize(table, level="block", method="sqrt", clip=[25, 75])
    # layer 1 mlp [0, 10, 20]: p25 = 5, p75 = 15 -> [5, 10, 15]; then sqrt
    np.testing.assert_allclose(values(out, 1, "mlp"), np.sqrt([5, 10, 15]))
    # layer 0 attention [1, 3]: p25 = 1.5, p75 = 2.5
    np.testing.assert_allclose(values(out, 0, "attention"), np.sqrt([1.5, 2.5]))
    out = normalize(table, level="layer", method="minmax", clip=[25, 75])
    x = np.array([1, 3, 2, 4, 6], dtype=float)
    c = np.clip(x, np.percentile(x, 25), np.percentile(x, 75))
    np.testing.assert_allclose(np.concatenate([values(out, 0, "attention"), values(out, 0, "mlp")]),
                               (c - c.min()) / (c.max() - c.min()))


def test_block_level_keeps_attention_and_mlp_apart() -> None:
    table, _ = hand_table()
    base = normalize(table, level="block", method="zscore", clip=[5, 95])
    changed = table.copy()
    att = changed["group_type"] == "attention"
    changed.loc[att, "importance"] = changed.loc[att, "importance"] * 1000 + 7
    out = normalize(changed, level="block", method="zscore", clip=[5, 95])
    mlp = (table["group_type"] == "mlp").to_numpy()
    np.testing.assert_allclose(out["importance"].to_numpy()[mlp], base["importance"].to_numpy()[mlp])
    # at layer level the MLP values do change
    lay_a = normalize(table, level="layer", method="zscore", clip=[])
    lay_b = normalize(changed, level="layer", method="zscore", clip=[])
    assert not np.allclose(lay_a["importance"].to_numpy()[mlp], lay_b["importance"].to_numpy()[mlp])


@pytest.mark.parametrize("method", ["log", "minmax", "zscore", "sqrt"])
@pytest.mark.parametrize("level", ["layer", "block"])
def test_degenerate_units_give_no_nan(method: str, level: str) -> None:
    res = make_result([[2.0], [0.0]], [[2.0], [0.0]])  # one group per block, one layer all zero
    table = build_table(res, GroupCosts.from_lists([5, 5], [1, 1], [1, 1], [1, 1]))
    out = normalize(table, level=level, method=method, clip=[10, 90])
    assert np.isfinite(out["importance"]).all() and np.isfinite(out["score"]).all()
    if method in ("minmax", "zscore", "log"):
        np.testing.assert_array_equal(out["importance"], 0.0)


def test_zscore_negative_and_tied_scores_rank_deterministically() -> None:
    rng = np.random.default_rng(3)
    res = SimpleNamespace(attention=torch.from_numpy(rng.integers(0, 3, (3, 4)).astype(float)),
                          mlp=torch.from_numpy(rng.integers(0, 3, (3, 12)).astype(float)))
    costs = GroupCosts.from_lists([20, 30, 40], [3, 3, 3], [4] * 3, [12] * 3)
    table = normalize(build_table(res, costs), level="block", method="zscore", clip=[])
    assert (table["score"] < 0).any()
    order = rank_order(table)
    key = list(zip(table["score"].to_numpy()[order],
                   (table["raw_importance"] / table["cost"]).to_numpy()[order],
                   table["layer_idx"].to_numpy()[order],
                   table["group_type"].cat.codes.to_numpy()[order],
                   table["group_idx"].to_numpy()[order], strict=True))
    assert key == sorted(key)
    # the ranking does not depend on the row order of the table
    shuffled = table.sample(frac=1.0, random_state=1).reset_index(drop=True)
    canon = table[["layer_idx", "group_type", "group_idx"]].iloc[order].to_numpy().tolist()
    canon2 = shuffled[["layer_idx", "group_type", "group_idx"]].iloc[rank_order(shuffled)].to_numpy().tolist()
    assert canon == canon2
    a = select(table, ratio=0.3, prunable_total=costs.prunable_total)
    b = select(shuffled, ratio=0.3, prunable_total=costs.prunable_total)
    ta, tb = table.assign(pruned=a.pruned), shuffled.assign(pruned=b.pruned)
    assert mask_sha256(ta) == mask_sha256(tb)


# ---------------------------------------------------------------- selection


def test_select_hand_example() -> None:
    table, costs = hand_table()  # scores: att 0.1 0.3 | 1 2 3 ; att 0.5 0.5 | 0 5 10
    sel = select(table, ratio=0.3, prunable_total=costs.prunable_total)  # target ceil(0.3 × 52) = 16
    # order: mlp(1,0) 0 [2], att(0,0) 0.1 [10] -> 12, att(0,1) 0.3 [10] -> 22 >= 16
    assert sel.pruned.tolist() == [True, True, False, False, False, False, False, True, False, False]
    assert sel.removed_parameters == 22 and sel.target_parameters == 16 and sel.reachable
    assert sel.achieved_ratio == pytest.approx(22 / 52)
    # max_rate 0.5 -> attention cap 1 per layer: att(0,1) is skipped, att(1,0) is next (0.5)
    sel = select(table, ratio=0.3, prunable_total=costs.prunable_total, max_rate=0.5)
    assert sel.pruned.tolist() == [True, False, False, False, False, True, False, True, False, False]
    # protect layer 0 and cap at 0.5: only one attention group (10) and one MLP channel (2) of layer 1 may go
    sel = select(table, ratio=0.3, prunable_total=costs.prunable_total, max_rate=0.5, protect_layers=[0])
    assert not sel.pruned[:5].any()
    assert not sel.reachable and sel.removed_parameters == sel.max_parameters == 10 + 2
    assert "allow at most 12" in sel.message and "16" in sel.message
    # min_rate forces the lowest-scored group(s) of every block first
    sel = select(table, ratio=0.01, prunable_total=costs.prunable_total, min_rate=0.5)
    assert sel.pruned.tolist() == [True, False, True, True, False, True, False, True, True, False]
    assert "min_rate" in sel.message


def test_select_full_block_removal() -> None:
    res = make_result([[1.0, 1.0], [1e-6, 1e-6]], [[1.0] * 4, [1e-6] * 4])
    costs = GroupCosts.from_lists([8, 8], [2, 2], [2, 2], [4, 4])
    table = build_table(res, costs)
    sel = select(table, ratio=0.5, prunable_total=costs.prunable_total)
    assert sel.pruned.tolist() == [False] * 6 + [True] * 6
    sel = select(table, ratio=0.5, prunable_total=costs.prunable_total, early_layers=2, early_max_rate=0.5)
    assert sel.pruned.reshape(2, 6).sum(axis=1).tolist() == [3, 3]


def reference_select(table: pd.DataFrame, ratio: float, total: int, floor: np.ndarray, cap: np.ndarray,
                     block: np.ndarray) -> np.ndarray:
    """Slow, obvious implementation: floors first, then the global order within the caps."""
    order = rank_order(table)
    cost = table["cost"].to_numpy()
    target = math.ceil(round(ratio * total, 6))
    taken = np.zeros(len(table), dtype=bool)
    count = np.zeros(len(cap), dtype=int)
    removed = 0
    for i in order:  # floors: the lowest-ranked groups of each block
        if count[block[i]] < floor[block[i]]:
            taken[i] = True
            count[block[i]] += 1
            removed += int(cost[i])
    for i in order:
        if removed >= target:
            break
        if not taken[i] and count[block[i]] < cap[block[i]]:
            taken[i] = True
            count[block[i]] += 1
            removed += int(cost[i])
    return taken


@st.composite
def problems(draw: st.DrawFn) -> dict:
    layers = draw(st.integers(1, 6))
    n_att = [draw(st.integers(1, 6)) for _ in range(layers)]
    n_mlp = [draw(st.integers(1, 24)) for _ in range(layers)]
    c_att = [draw(st.integers(1, 500)) for _ in range(layers)]
    c_mlp = [draw(st.integers(1, 60)) for _ in range(layers)]
    tied = draw(st.booleans())  # small integer importances produce many exact ties
    imp = st.integers(0, 3).map(float) if tied else st.floats(0.0, 1e3, allow_nan=False)
    att = [[draw(imp) for _ in range(max(n_att))] for _ in range(layers)]
    mlp = [[draw(imp) for _ in range(max(n_mlp))] for _ in range(layers)]
    lo = draw(st.floats(0.0, 1.0))
    hi = draw(st.floats(lo, 1.0))
    return {
        "result": make_result(att, mlp),
        "costs": GroupCosts.from_lists(c_att, c_mlp, n_att, n_mlp),
        "ratio": draw(st.floats(0.01, 0.99)),
        "min_rate": draw(st.sampled_from([0.0, 0.0, lo])),
        "max_rate": draw(st.sampled_from([1.0, hi])),
        "protect": draw(st.lists(st.integers(0, layers - 1), max_size=layers, unique=True)),
        "early": draw(st.integers(0, layers)),
        "early_max": draw(st.floats(0.0, 1.0)),
        "norm": draw(st.sampled_from([("none", "log"), ("block", "zscore"), ("layer", "minmax"),
                                      ("block", "log")])),
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_select_constraints_hold(p: dict) -> None:
    costs: GroupCosts = p["costs"]
    table = normalize(build_table(p["result"], costs), level=p["norm"][0], method=p["norm"][1], clip=[])
    kw = {"min_rate": p["min_rate"], "max_rate": p["max_rate"], "protect_layers": p["protect"],
          "early_layers": p["early"], "early_max_rate": p["early_max"]}
    sel = select(table, ratio=p["ratio"], prunable_total=costs.prunable_total, **kw)
    block, floor, cap = block_limits(table, **kw)
    pruned = sel.pruned
    cost = table["cost"].to_numpy()
    layer = table["layer_idx"].to_numpy()
    n_block = np.bincount(block, minlength=len(cap))
    count = np.bincount(block[pruned], minlength=len(cap))

    # caps / floors per block, with the documented formulas
    for b in range(len(cap)):
        li = b // 2
        rate = min(p["max_rate"], p["early_max"]) if li < p["early"] else p["max_rate"]
        expect_cap = 0 if li in p["protect"] else math.floor(rate * n_block[b] + 1e-9)
        expect_floor = 0 if li in p["protect"] else min(math.ceil(p["min_rate"] * n_block[b] - 1e-9), expect_cap)
        assert cap[b] == expect_cap and floor[b] == expect_floor
        assert floor[b] <= count[b] <= cap[b]
    assert not pruned[np.isin(layer, p["protect"])].any()

    # within every block the pruned groups are its lowest-ranked ones
    order = rank_order(table)
    pos = np.empty(len(order), dtype=int)
    pos[order] = np.arange(len(order))
    for b in range(len(cap)):
        in_b = block == b
        if pruned[in_b].any() and (~pruned[in_b]).any():
            assert pos[in_b & pruned].max() < pos[in_b & ~pruned].min()

    removed = int(cost[pruned].sum())
    assert removed == sel.removed_parameters
    assert sel.achieved_ratio == pytest.approx(removed / costs.prunable_total)
    allowed_total = int(sum(cap[b] and cost[block == b][: cap[b]].sum() for b in range(len(cap))))
    assert sel.max_parameters == allowed_total  # caps share a cost within a block
    assert sel.target_parameters >= p["ratio"] * costs.prunable_total - 1e-6
    if sel.reachable:
        assert removed >= sel.target_parameters
        if sel.floor_parameters < sel.target_parameters:
            # overshoot bounded by the cost of the last group taken (at most the largest pruned cost)
            assert removed - sel.target_parameters < cost[pruned].max()
    else:
        assert sel.max_parameters < sel.target_parameters
        assert removed == sel.max_parameters
        assert "allow at most" in sel.message
    assert sel.reachable == (max(sel.max_parameters, sel.floor_parameters) >= sel.target_parameters)

    # exactly the obvious greedy algorithm
    ref = reference_select(table, p["ratio"], costs.prunable_total, floor, cap, block)
    np.testing.assert_array_equal(pruned, ref)


# ---------------------------------------------------------------- allocate, summary, writers


def test_allocate_summary_hash_and_writers(tmp_path) -> None:
    rng = np.random.default_rng(7)
    res = SimpleNamespace(attention=torch.from_numpy(rng.random((4, 2))), mlp=torch.from_numpy(rng.random((4, 16))))
    costs = GroupCosts.from_lists([100] * 4, [12] * 4, [2] * 4, [16] * 4)
    sess = Session.model_validate({
        "pruning": {"ratio": 0.3, "max_rate": 0.8, "protect_layers": [3], "depth_weight": 0.5},
        "normalization": {"level": "block", "method": "minmax", "clip": [1, 99]},
        "correction": {"temperature": 1.0, "tau": 0.5},
    })
    block = SimpleNamespace(attention=[0.5, 1.0, 2.0, 1.0], mlp=[1.0, 2.0, 1.0, 3.0], layer=[2.0, 1.0, 1.0, 4.0])
    alloc = allocate(res, costs, sess, block=block)
    assert isinstance(alloc, Allocation)
    assert alloc.reachable and alloc.achieved_ratio >= 0.3
    s = alloc.summary
    assert list(s.columns) == ["layer_idx", "attention_groups", "attention_pruned", "attention_rate",
                               "mlp_groups", "mlp_pruned", "mlp_rate", "params_before", "params_after"]
    assert s["params_before"].sum() == costs.prunable_total
    assert costs.prunable_total - s["params_after"].sum() == alloc.removed_parameters
    assert s.loc[3, "attention_pruned"] == 0 and s.loc[3, "mlp_pruned"] == 0
    assert (s["mlp_rate"] <= 0.8).all() and (s["attention_rate"] <= 0.8).all()
    np.testing.assert_allclose(s["mlp_rate"], s["mlp_pruned"] / s["mlp_groups"])

    idx = alloc.pruned_indices()
    assert sorted(idx) == [0, 1, 2, 3]
    total = sum(len(v["attention"]) * 100 + len(v["mlp"]) * 12 for v in idx.values())
    assert total == alloc.removed_parameters
    # documented byte format of the mask hash
    triples = sorted((li, 0 if kind == "attention" else 1, i)
                     for li, v in idx.items() for kind in ("attention", "mlp") for i in v[kind])
    raw = b"".join(np.array(t, dtype="<i4").tobytes() for t in triples)
    assert alloc.mask_sha256 == hashlib.sha256(raw).hexdigest()

    # same settings -> same mask; different ratio -> different mask
    assert allocate(res, costs, sess, block=block).mask_sha256 == alloc.mask_sha256
    other = allocate(res, costs, sess.with_updates({"pruning.ratio": 0.4}), block=block)
    assert other.mask_sha256 != alloc.mask_sha256

    csv = write_table_csv(alloc.table, tmp_path / "analysis" / "global_group_table.csv")
    back = pd.read_csv(csv)
    assert list(back.columns) == list(alloc.table.columns) and len(back) == len(alloc.table)
    assert back["pruned"].sum() == alloc.table["pruned"].sum()
    csv_path, txt_path = write_summary(alloc.summary, tmp_path / "analysis")
    assert pd.read_csv(csv_path).shape == alloc.summary.shape
    text = txt_path.read_text()
    assert "total" in text and f"{costs.prunable_total:,}" in text
    assert len(text.splitlines()) == 2 + 4 + 3  # header, rule, 4 layers, rule, total, removed
    assert not [p for p in (tmp_path / "analysis").iterdir() if p.name.endswith(".tmp")]


def test_allocate_defaults_and_summary_of_empty_selection() -> None:
    table, costs = hand_table()
    alloc = allocate(SimpleNamespace(attention=torch.tensor([[1.0, 3], [5, 5]]),
                                     mlp=torch.tensor([[2.0, 4, 6], [0, 10, 20]])), costs, Session())
    assert alloc.target_ratio == 0.2 and alloc.removed_parameters >= math.ceil(0.2 * 52)
    empty = layer_summary(table)
    assert empty["params_after"].tolist() == empty["params_before"].tolist() == [26, 26]
    assert mask_sha256(table) == hashlib.sha256(b"").hexdigest()


def test_group_costs_from_model_matches_adapter() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prune_core.adapters import get_adapter

    cfg = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = Qwen2ForCausalLM(cfg)
    adapter = get_adapter(model)
    costs = GroupCosts.from_model(model, adapter)
    assert costs.n_attention == [2, 2] and costs.n_mlp == [40, 40]
    assert costs.attention == [2 * 8 * 32 + 2 * 2 * 8 * 32 + 8 * 2 + 2 * 8] * 2  # + k, v, q biases
    assert costs.prunable_total == adapter.prunable_parameters(model)
    assert GroupCosts.from_dict(costs.to_dict()) == costs


def test_mean_normalization_keeps_ratios_inside_a_unit() -> None:
    table, _ = hand_table()
    out = normalize(table, level="block", method="mean", clip=[])
    np.testing.assert_allclose(values(out, 0, "attention"), [1 / 2, 3 / 2])
    np.testing.assert_allclose(values(out, 1, "mlp"), [0, 10 / 10, 20 / 10])
    out = normalize(table, level="layer", method="mean", clip=[])  # layer 0: mean of [1, 3, 2, 4, 6] = 3.2
    np.testing.assert_allclose(values(out, 0, "mlp"), np.array([2, 4, 6]) / 3.2)
    neg = table.copy()
    neg["importance"] = neg["importance"] - 100.0  # a unit whose mean is <= 0 gives 0, never a sign flip
    out = normalize(neg, level="block", method="mean", clip=[])
    assert (out["importance"] == 0).all()


def test_attention_weight_scales_attention_scores_only() -> None:
    from prune_core.allocation import weigh_attention

    table, _ = hand_table()
    table = table.assign(score=np.where(table["group_type"] == "attention", [-1.0] * len(table), table["score"]))
    out = weigh_attention(table, 4.0)
    att = (table["group_type"] == "attention").to_numpy()
    np.testing.assert_allclose(out["score"].to_numpy()[att], -0.25)  # negative scores are divided
    np.testing.assert_allclose(out["score"].to_numpy()[~att], table["score"].to_numpy()[~att])
    assert weigh_attention(table, 1.0) is table


def test_blocks_mlp_never_prunes_attention_and_negative_layers_count_from_the_end() -> None:
    from prune_core.allocation import allocate

    res = make_result([[1, 3], [5, 5], [2, 2]], [[2, 4, 6], [0, 10, 20], [1, 1, 1]])
    costs = GroupCosts.from_lists([10, 10, 10], [2, 2, 2], [2, 2, 2], [3, 3, 3])
    s = Session.model_validate({"pruning": {"ratio": 0.1, "blocks": "mlp", "protect_layers": [-1]}})
    alloc = allocate(res, costs, s)
    pruned = alloc.table[alloc.table["pruned"]]
    assert set(pruned["group_type"]) == {"mlp"}
    assert 2 not in set(pruned["layer_idx"])  # -1 = the last layer, protected
    assert alloc.achieved_ratio >= 0.1 and alloc.reachable


def test_uniform_allocation_gives_every_unprotected_block_the_same_rate() -> None:
    n = 10
    att = [[1.0] * 2 for _ in range(4)]
    mlp = [[float(100 * layer + j) for j in range(n)] for layer in range(4)]  # layer 0 is least important
    costs = GroupCosts.from_lists([50] * 4, [3] * 4, [2] * 4, [n] * 4)
    res = make_result(att, mlp)
    total = costs.prunable_total
    sel = select(build_table(res, costs), ratio=0.11, prunable_total=total, blocks="mlp", mode="uniform",
                 protect_layers=[0])
    table = build_table(res, costs).assign(pruned=sel.pruned)
    per_layer = table[table["group_type"] == "mlp"].groupby("layer_idx")["pruned"].sum().to_dict()
    assert per_layer[0] == 0  # protected
    counts = [per_layer[layer] for layer in (1, 2, 3)]
    assert len(set(counts)) == 1  # one width: blocks of one size take the rounding's extra group together
    assert math.ceil(0.11 * total) <= sel.removed_parameters < math.ceil(0.11 * total) + 3 * 7
    for layer in (1, 2, 3):  # within a layer, the lowest-ranked channels go
        rows = table[(table["layer_idx"] == layer) & (table["group_type"] == "mlp")]
        assert list(rows.sort_values("group_idx")["pruned"]) == sorted(rows["pruned"], reverse=True)
    glob = select(build_table(res, costs), ratio=0.1, prunable_total=total, blocks="mlp", protect_layers=[0])
    gtable = build_table(res, costs).assign(pruned=glob.pruned)
    gcounts = gtable[gtable["pruned"]].groupby("layer_idx").size().to_dict()
    assert gcounts[1] == n and max(gcounts.values()) - min(gcounts.values()) > 1  # global empties layer 1 first


def test_depth_ramp_raises_the_uniform_rate_with_depth_and_still_meets_the_target() -> None:
    from prune_core.allocation.select import depth_weights

    n, layers = 40, 6
    att = [[1.0] * 2 for _ in range(layers)]
    mlp = [[float(j) for j in range(n)] for _ in range(layers)]
    costs = GroupCosts.from_lists([50] * layers, [3] * layers, [2] * layers, [n] * layers)
    res = make_result(att, mlp)
    total = costs.prunable_total
    sel = select(build_table(res, costs), ratio=0.2, prunable_total=total, blocks="mlp", mode="uniform",
                 protect_layers=[0, 5], depth_ramp=0.5)
    table = build_table(res, costs).assign(pruned=sel.pruned)
    per_layer = table[table["group_type"] == "mlp"].groupby("layer_idx")["pruned"].sum().to_dict()
    assert per_layer[0] == per_layer[5] == 0  # protected
    counts = [per_layer[layer] for layer in (1, 2, 3, 4)]
    assert counts == sorted(counts) and counts[-1] >= 2.5 * counts[0]  # 0.5× … 1.5× the mean rate
    target = math.ceil(0.2 * total)
    assert target <= sel.removed_parameters < target + 3  # met, overshooting by less than one channel
    # the weights: 1 ∓ ramp at the first and last prunable layer, linear between, 1 in layers not pruned
    cap = np.array([0, 0, 0, 5, 0, 5, 0, 5, 0, 0])
    np.testing.assert_allclose(depth_weights(cap, 0.5), [1, 1, 0.5, 0.5, 1, 1, 1.5, 1.5, 1, 1])  # both blocks of a layer
    flat = select(build_table(res, costs), ratio=0.2, prunable_total=total, blocks="mlp", mode="uniform",
                  protect_layers=[0, 5])
    assert flat.removed_parameters == select(build_table(res, costs), ratio=0.2, prunable_total=total,
                                             blocks="mlp", mode="uniform", protect_layers=[0, 5],
                                             depth_ramp=0.0).removed_parameters
    with pytest.raises(BadInput, match="depth_ramp"):
        select(build_table(res, costs), ratio=0.2, prunable_total=total, mode="uniform", depth_ramp=1.0)


def test_hybrid_takes_the_global_rankings_heads_and_one_mlp_rate() -> None:
    n, layers = 20, 5
    att = [[0.01 * (layer + 1), 50.0, 60.0] for layer in range(layers)]  # one weak head per layer, weakest first
    mlp = [[float(10 * layer + j) for j in range(n)] for layer in range(layers)]  # layer 0's channels weakest
    costs = GroupCosts.from_lists([40] * layers, [3] * layers, [2] * layers, [n] * layers)
    res = make_result(att, mlp)
    total = costs.prunable_total
    kw = dict(ratio=0.3, prunable_total=total, protect_layers=[4])
    glob = select(build_table(res, costs), **kw)
    hyb = select(build_table(res, costs), mode="hybrid", **kw)
    table = build_table(res, costs)
    is_att = (table["group_type"] == "attention").to_numpy()
    assert (hyb.pruned[is_att] == glob.pruned[is_att]).all() and glob.pruned[is_att].any()  # the same heads
    per_layer = table.assign(pruned=hyb.pruned)[~is_att].groupby("layer_idx")["pruned"].sum().to_dict()
    assert per_layer[4] == 0 and len({per_layer[layer] for layer in range(4)}) == 1  # one MLP rate
    gl = table.assign(pruned=glob.pruned)[~is_att].groupby("layer_idx")["pruned"].sum().to_dict()
    assert len({gl[layer] for layer in range(4)}) > 1  # where the global ranking's MLP budget is uneven
    target = math.ceil(0.3 * total)
    assert target <= hyb.removed_parameters < target + 4 * 3  # met, the extra channel shared by same-size blocks
    assert hyb.message.startswith("removed ") and hyb.floor_parameters == 0  # not blamed on min_rate
    uni = select(build_table(res, costs), mode="uniform", **kw)
    assert uni.message.startswith("removed ") and uni.floor_parameters == 0
    with pytest.raises(BadInput, match="hybrid"):
        select(build_table(res, costs), mode="layerwise", **kw)


def test_global_share_blends_the_uniform_rate_with_the_global_rankings_rates() -> None:
    n, layers = 40, 6
    att = [[1.0] * 2 for _ in range(layers)]
    mlp = [[float(j + 3 * layer * j) for j in range(n)] for layer in range(layers)]  # deeper layers matter more
    costs = GroupCosts.from_lists([50] * layers, [3] * layers, [2] * layers, [n] * layers)
    res = make_result(att, mlp)
    kw = dict(ratio=0.25, prunable_total=costs.prunable_total, blocks="mlp", protect_layers=[0])

    def per_block(sel: Selection) -> np.ndarray:
        table = build_table(res, costs).assign(pruned=sel.pruned)
        return table[table["group_type"] == "mlp"].groupby("layer_idx")["pruned"].sum().to_numpy()

    uni = per_block(select(build_table(res, costs), mode="uniform", **kw))
    glob = per_block(select(build_table(res, costs), **kw))
    none = select(build_table(res, costs), mode="uniform", global_share=0.0, **kw)
    assert (per_block(none) == uni).all()
    full = per_block(select(build_table(res, costs), mode="uniform", global_share=1.0, **kw))
    assert np.abs(full - glob).max() <= 1  # the global ranking's counts, up to the rounding's extra channel
    half_sel = select(build_table(res, costs), mode="uniform", global_share=0.5, **kw)
    half = per_block(half_sel)
    assert np.abs(half - (uni + glob) / 2).max() <= 1.5 and half[0] == 0  # halfway; the protected layer kept
    target = math.ceil(0.25 * costs.prunable_total)
    assert target <= half_sel.removed_parameters < target + 3  # met, overshooting by less than one channel
    with pytest.raises(BadInput, match="global_share"):
        select(build_table(res, costs), mode="uniform", global_share=1.5, **kw)
