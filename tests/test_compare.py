"""compare_results on two synthetic results folders: rates, Jaccard overlap, PPL, mask hash, settings."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import sessions
from prune_core.compare import compare_results, format_comparison, mask_sha256_of, pruned_set
from prune_core.errors import BadInput
from sessions import Session


def table_with(pruned: set[tuple[int, str, int]], layers: int = 2, att: int = 4, mlp: int = 8) -> pd.DataFrame:
    rows = []
    for layer in range(layers):
        for kind, n in (("attention", att), ("mlp", mlp)):
            for j in range(n):
                rows.append({"layer_idx": layer, "group_type": kind, "group_idx": j, "raw_importance": 1.0,
                             "importance": 1.0, "cost": 10, "score": 0.1, "pruned": (layer, kind, j) in pruned})
    return pd.DataFrame(rows)


def write_results(folder: Path, pruned: set[tuple[int, str, int]], *, ppl: tuple[float, float] | None,
                  session: Session | None = None, summary: bool = True, sha: bool = True) -> Path:
    (folder / "analysis").mkdir(parents=True)
    table = table_with(pruned)
    table.to_csv(folder / "analysis" / "global_group_table.csv", index=False)
    if summary:
        from prune_core.allocation.summary import layer_summary

        layer_summary(table, 2).to_csv(folder / "analysis" / "pruning_summary_by_layer.csv", index=False)
    metrics: dict = {"ratio": {"achieved": len(pruned) / 24}}
    if ppl is not None:
        metrics["perplexity"] = {"before": {"ppl": ppl[0], "tokens": 100}, "after": {"ppl": ppl[1], "tokens": 100}}
    if sha:
        metrics["mask_sha256"] = mask_sha256_of(pruned)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    sessions.save(session or Session(), folder / "session.toml", extra_tables={"provenance": {"device": "cpu"}})
    return folder


A = {(0, "attention", 0), (0, "mlp", 1), (0, "mlp", 2), (1, "mlp", 0), (1, "mlp", 5)}
B = {(0, "attention", 0), (0, "mlp", 1), (1, "mlp", 0), (1, "mlp", 6), (1, "attention", 3), (1, "mlp", 7)}


def test_compare_two_runs(tmp_path: Path):
    a = write_results(tmp_path / "a", A, ppl=(20.0, 31.5))
    b = write_results(tmp_path / "b", B, ppl=(20.0, 28.25),
                      session=Session().with_updates({"correction.temperature": 1.0, "session.name": "b"}))
    res = compare_results(a, b)
    ov = res["overlap"]
    # A ∩ B = {(0,att,0), (0,mlp,1), (1,mlp,0)} = 3; A ∪ B = 5 + 6 − 3 = 8
    assert ov["intersection"] == 3 and ov["union"] == 8
    assert ov["jaccard"] == pytest.approx(3 / 8)
    assert (ov["only_a"], ov["only_b"]) == (2, 3)
    assert ov["attention"]["jaccard"] == pytest.approx(1 / 2)
    assert ov["mlp"]["jaccard"] == pytest.approx(2 / 6)
    assert res["identical"] is False
    assert res["a"]["ppl_before"] == 20.0 and res["a"]["ppl_after"] == 31.5
    assert res["b"]["ppl_after"] == 28.25
    assert res["ppl_after_diff"] == pytest.approx(-3.25)
    assert res["a"]["mask_sha256"] == mask_sha256_of(A) != res["b"]["mask_sha256"]
    assert res["a"]["pruned_groups"] == 5 and res["b"]["pruned_attention"] == 2
    layers = {r["layer"]: r for r in res["layers"]}
    assert layers[0]["mlp_rate_a"] == pytest.approx(2 / 8) and layers[0]["mlp_rate_b"] == pytest.approx(1 / 8)
    assert layers[0]["mlp_rate_diff"] == pytest.approx(-1 / 8)
    assert layers[1]["attention_rate_diff"] == pytest.approx(0.25)
    assert layers[1]["mlp_rate_diff"] == pytest.approx(3 / 8 - 2 / 8)
    assert res["largest_rate_diff"] == {"layer": 1, "block": "attention", "diff": pytest.approx(0.25)}
    assert res["session_diff"] == {"correction.temperature": [0.0, 1.0]}
    json.dumps(res, allow_nan=False)
    text = format_comparison(res)
    assert "Jaccard 0.375" in text and "identical selection: no" in text
    assert "correction.temperature: 0.0 -> 1.0" in text


def test_identical_runs_and_missing_files(tmp_path: Path):
    a = write_results(tmp_path / "a", A, ppl=None, summary=False, sha=False)
    b = write_results(tmp_path / "b", set(A), ppl=None)
    res = compare_results(a, b)
    assert res["identical"] is True
    assert res["overlap"]["jaccard"] == 1.0
    assert res["a"]["ppl_after"] is None and res["ppl_after_diff"] is None
    # a's hash was computed from its table and matches b's from metrics.json
    assert res["a"]["mask_sha256_source"] == "global_group_table.csv"
    assert res["a"]["mask_sha256"] == res["b"]["mask_sha256"]
    # rates rebuilt from the table when the summary CSV is missing
    assert {r["layer"]: r["mlp_rate_a"] for r in res["layers"]} == {0: 2 / 8, 1: 2 / 8}
    assert res["session_diff"] == {}


def test_empty_selections_are_identical(tmp_path: Path):
    res = compare_results(write_results(tmp_path / "a", set(), ppl=None), write_results(tmp_path / "b", set(), ppl=None))
    assert res["overlap"]["jaccard"] == 1.0 and res["identical"] is True


def test_legacy_ppl_keys_are_read(tmp_path: Path):
    a = write_results(tmp_path / "a", A, ppl=None)
    (a / "metrics.json").write_text(json.dumps({"ppl_before": 10.0, "ppl_after": 12.0}))
    res = compare_results(a, write_results(tmp_path / "b", B, ppl=(10.0, 11.0)))
    assert res["a"]["ppl_before"] == 10.0 and res["ppl_after_diff"] == pytest.approx(-1.0)


def test_mask_hash_matches_the_allocation(tmp_path: Path):
    from prune_core.allocation.summary import mask_sha256

    table = table_with(B)
    assert mask_sha256_of(B) == mask_sha256(table)
    path = tmp_path / "t.csv"
    table.to_csv(path, index=False)
    assert pruned_set(pd.read_csv(path)) == B


def test_bad_folders(tmp_path: Path):
    with pytest.raises(BadInput):
        compare_results(tmp_path / "nope", tmp_path / "nope2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput) as err:
        compare_results(tmp_path / "empty", tmp_path / "empty")
    assert "metrics.json" in str(err.value)
