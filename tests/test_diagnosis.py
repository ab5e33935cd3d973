"""Diagnosis rules on synthetic statistics and summaries: finding, severity, numbers, fix; reports; fixes."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pandas as pd
import pytest

import sessions
from prune_core.diagnosis import (
    Finding,
    diagnose,
    findings_from_dicts,
    gradient_diagnosis,
    gradient_statistics,
    write_reports,
)
from prune_core.fixes import apply_fix, fix_changes
from sessions import Session, SessionError

L = 10


def make_stats(means: list[float] | None = None, n: int = L) -> dict[str, dict[str, list[float]]]:
    means = list(means) if means is not None else [1e-3] * n
    out = {}
    for block in ("attention", "mlp", "layer"):
        out[block] = {
            "mean": list(means),
            "std": [2 * m for m in means],
            "norm": [100 * m for m in means],
            "max": [50 * m for m in means],
            "min": [m / 1000 for m in means],
        }
    return out


def make_summary(att: list[float] | None = None, mlp: list[float] | None = None, n: int = L,
                 att_groups: int = 4, mlp_groups: int = 100) -> pd.DataFrame:
    att = list(att) if att is not None else [0.25] * n
    mlp = list(mlp) if mlp is not None else [0.2] * n
    att_p = [round(r * att_groups) for r in att]
    mlp_p = [round(r * mlp_groups) for r in mlp]
    return pd.DataFrame({
        "layer_idx": list(range(n)),
        "attention_groups": [att_groups] * n,
        "attention_pruned": att_p,
        "attention_rate": [p / att_groups for p in att_p],
        "mlp_groups": [mlp_groups] * n,
        "mlp_pruned": mlp_p,
        "mlp_rate": [p / mlp_groups for p in mlp_p],
        "params_before": [1000] * n,
        "params_after": [800] * n,
    })


def make_table(summary: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for rec in summary.to_dict("records"):
        layer = int(rec["layer_idx"])
        for kind in ("attention", "mlp"):
            n, p = int(rec[f"{kind}_groups"]), int(rec[f"{kind}_pruned"])
            for j in range(n):
                imp = float(j + 1 + layer)
                rows.append({"layer_idx": layer, "group_type": kind, "group_idx": j, "raw_importance": imp,
                             "importance": imp, "cost": 10, "score": imp / 10, "pruned": j < p})
    return pd.DataFrame(rows)


def by_issue(findings: list[Finding]) -> dict[str, Finding]:
    return {f.issue: f for f in findings}


def check_fix_valid(session: Session, finding: Finding) -> Session:
    updated = session.with_updates(finding.fix)  # raises if a key or value is invalid
    for key, value in finding.fix.items():
        section, _, name = key.partition(".")
        assert getattr(getattr(updated, section), name) == value
    return updated


def test_clean_run_gives_single_info_finding():
    s = Session()
    found = diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(), session=s)
    assert [f.issue for f in found] == ["no_problems"]
    assert found[0].severity == "info"
    assert found[0].fix == {}
    assert "1.0×" in found[0].description


@pytest.mark.parametrize(("ratio", "severity"), [(50.0, None), (2847.3, "critical"), (500.0, "high")])
def test_gradient_scale_ratio(ratio: float, severity: str | None):
    means = [1e-3] * L
    means[2] = 1e-3 / ratio
    s = Session()
    found = by_issue(diagnose(stats=make_stats(means), stats_label="gradient", summary=make_summary(), session=s))
    if severity is None:
        assert "gradient_scale_ratio" not in found
        return
    f = found["gradient_scale_ratio"]
    assert f.severity == severity
    assert f"{ratio:,.1f}×" in f.description
    assert "layer 2" in f.description
    assert f.fix == {"normalization.level": "block", "normalization.method": "log"}
    check_fix_valid(s, f)


def test_scale_ratio_ignores_zero_and_nan_layers():
    means = [1e-3] * L
    means[3] = 0.0
    means[4] = math.nan
    means[5] = 2e-3
    found = diagnose(stats=make_stats(means), stats_label="gradient", summary=make_summary(), session=Session())
    assert "gradient_scale_ratio" not in by_issue(found)  # 2× only


def test_scale_ratio_downgraded_when_already_normalized():
    means = [1e-3] * L
    means[0] = 1e-8
    s = Session().with_updates({"normalization.level": "block"})
    f = by_issue(diagnose(stats=make_stats(means), stats_label="gradient", summary=make_summary(), session=s))[
        "gradient_scale_ratio"]
    assert f.severity == "info"
    assert f.fix == {}
    s2 = Session().with_updates({"normalization.level": "layer"})
    f2 = by_issue(diagnose(stats=make_stats(means), stats_label="gradient", summary=make_summary(), session=s2))[
        "gradient_scale_ratio"]
    assert f2.severity == "warning"
    assert f2.fix["normalization.level"] == "block"


def test_wanda_is_phrased_as_activation():
    means = [1.0] * L
    means[7] = 1e-4
    found = by_issue(diagnose(stats=make_stats(means), stats_label="activation", summary=make_summary(),
                              session=Session().with_updates({"importance.method": "wanda"})))
    f = found["activation_scale_ratio"]
    assert "activation norm" in f.description
    assert "gradient" not in f.description.lower()


def test_one_over_pruned_block_is_a_warning():
    mlp = [0.2] * L
    mlp[8] = 0.95
    s = Session()
    f = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(mlp=mlp), session=s))[
        "blocks_over_pruned"]
    assert f.severity == "warning"
    assert "layer 8 mlp 95.0%" in f.description
    assert "1 of 20 blocks" in f.description
    assert f.fix == {"correction.temperature": 1.0, "correction.tau": 0.0}
    check_fix_valid(s, f)


def test_three_over_pruned_blocks_are_high_and_fix_uses_max_rate_when_correction_on():
    mlp = [0.2] * L
    for i in (6, 7, 8):
        mlp[i] = 0.99
    s = Session().with_updates({"correction.temperature": 1.0})
    f = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(mlp=mlp), session=s))[
        "blocks_over_pruned"]
    assert f.severity == "high"
    for i in (6, 7, 8):
        assert f"layer {i} mlp 99.0%" in f.description
    assert f.fix == {"pruning.max_rate": 0.5}
    check_fix_valid(s, f)


def test_ten_percent_of_blocks_is_high():
    n = 5  # 10 blocks: one over-pruned block is 10 %
    mlp = [0.2] * n
    mlp[4] = 0.97
    f = by_issue(diagnose(stats=make_stats(n=n), stats_label="gradient", summary=make_summary(mlp=mlp, n=n),
                          session=Session()))["blocks_over_pruned"]
    assert f.severity == "high"
    assert "1 of 10 blocks (10.0%)" in f.description


def test_early_layers_over_pruned_is_critical():
    mlp = [0.2] * L
    mlp[2], mlp[3], mlp[4] = 0.99, 0.96, 0.91
    s = Session()
    found = diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(mlp=mlp), session=s)
    f = by_issue(found)["early_layers_over_pruned"]
    assert f.severity == "critical"
    assert found[0].severity == "critical"
    assert "3 of the first 5 layers" in f.description
    assert "layer 2 mlp 99.0%" in f.description
    assert f.fix == {"pruning.early_layers": 5, "pruning.early_max_rate": 0.3}
    check_fix_valid(s, f)
    # a 3-layer model: the fix never names more early layers than exist
    found3 = by_issue(diagnose(stats=make_stats(n=3), stats_label="gradient",
                               summary=make_summary(mlp=[0.2, 0.2, 0.99], n=3), session=s))
    f3 = found3["early_layers_over_pruned"]
    assert "1 of the first 3 layers" in f3.description
    assert f3.fix == {"pruning.early_layers": 3, "pruning.early_max_rate": 0.3}
    assert sessions.check_against_model(s.with_updates(f3.fix), 3) == []
    # a late over-pruned block alone is not an early-layer problem
    mlp2 = [0.2] * L
    mlp2[9] = 0.99
    found2 = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(mlp=mlp2), session=s))
    assert "early_layers_over_pruned" not in found2


def test_rate_spread_high():
    mlp = [0.2] * L
    mlp[1] = 0.0
    mlp[6] = 0.88  # below extreme_rate 0.9, so only the spread rule fires
    s = Session()
    found = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(mlp=mlp), session=s))
    assert "blocks_over_pruned" not in found
    f = found["rate_spread"]
    assert f.severity == "high"
    assert "0.0% (layer 1 mlp)" in f.description
    assert "88.0% (layer 6 mlp)" in f.description
    assert "88.0 points" in f.description
    assert f.fix == {"pruning.max_rate": 0.5, "pruning.min_rate": 0.05}
    check_fix_valid(s, f)
    # 5 % next to 88 %: a 5 % floor would change nothing, so only the cap is offered
    mlp[1] = 0.05
    f2 = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(mlp=mlp), session=s))[
        "rate_spread"]
    assert "83.0 points" in f2.description
    assert f2.fix == {"pruning.max_rate": 0.5}


def test_rate_spread_ignores_protected_layers():
    mlp = [0.7] * L
    att = [0.75] * L
    mlp[0] = att[0] = 0.0
    s = Session().with_updates({"pruning.protect_layers": [0]})
    found = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(att, mlp), session=s))
    assert "rate_spread" not in found


def test_nan_gradients_critical_and_zero_gradients_high():
    stats = make_stats()
    stats["layer"]["mean"][4] = math.nan
    stats["mlp"]["norm"][4] = math.inf
    for stat in stats["attention"]:
        stats["attention"][stat][6] = 0.0
    s = Session().with_updates({"model.dtype": "float16"})
    found = by_issue(diagnose(stats=stats, stats_label="gradient", summary=make_summary(), session=s))
    nan = found["nonfinite_gradient"]
    assert nan.severity == "critical"
    assert "layer 4 (mlp, layer)" in nan.description
    assert nan.fix == {"model.dtype": "float32"}
    check_fix_valid(s, nan)
    zero = found["zero_gradient"]
    assert zero.severity == "high"
    assert "layer 6 (attention)" in zero.description
    assert zero.fix == {"model.dtype": "float32"}
    # already float32: no dtype fix to offer
    found32 = by_issue(diagnose(stats=stats, stats_label="gradient", summary=make_summary(), session=Session()))
    assert found32["nonfinite_gradient"].fix == {}


def test_long_sequence_suggests_256():
    means = [1e-3] * L
    means[9] = 1e-6
    s = Session().with_updates({"data.seq_len": 512})
    found = by_issue(diagnose(stats=make_stats(means), stats_label="gradient", summary=make_summary(), session=s))
    f = found["long_sequence"]
    assert f.severity == "warning"
    assert "512 tokens" in f.description and "1,000.0×" in f.description
    assert f.fix == {"data.seq_len": 256}
    check_fix_valid(s, f)
    s2 = Session().with_updates({"data.seq_len": 256})
    assert "long_sequence" not in by_issue(
        diagnose(stats=make_stats(means), stats_label="gradient", summary=make_summary(), session=s2))


def test_second_order_negligible():
    s = Session().with_updates({"importance.method": "taylor_2nd"})
    found = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(), session=s,
                              second_order_share=2e-5))
    f = found["second_order_negligible"]
    assert f.severity == "warning"
    assert "2.00e-05" in f.description
    assert "the second-order pass changes nothing; use taylor (cheaper) or fisher_scale=tokens" in f.recommendation
    assert f.fix == {"importance.method": "taylor"}
    check_fix_valid(s, f)
    s_none = s.with_updates({"importance.fisher_scale": "none"})
    f2 = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(), session=s_none,
                           second_order_share=0.0))["second_order_negligible"]
    assert f2.fix == {"importance.fisher_scale": "tokens"}
    ok = by_issue(diagnose(stats=make_stats(), stats_label="gradient", summary=make_summary(), session=s,
                           second_order_share=0.05))
    assert "second_order_negligible" not in ok


def test_findings_sorted_by_severity_and_seed_case():
    """The seed's Mistral case: 2847× ratio, layers 2-4 MLP pruned 97/96/91 %."""
    means = [1e-3] * L
    means[2] = 1e-3 / 2847.3
    mlp = [0.15] * L
    mlp[2], mlp[3], mlp[4] = 0.9702, 0.9579, 0.9091
    s = Session().with_updates({"data.seq_len": 512})
    found = diagnose(stats=make_stats(means), stats_label="gradient", summary=make_summary(mlp=mlp), session=s)
    order = {"critical": 0, "high": 1, "warning": 2, "info": 3}
    assert [order[f.severity] for f in found] == sorted(order[f.severity] for f in found)
    issues = by_issue(found)
    assert issues["gradient_scale_ratio"].severity == "critical"
    assert issues["early_layers_over_pruned"].severity == "critical"
    assert issues["blocks_over_pruned"].severity == "high"
    assert issues["rate_spread"].severity == "high"
    assert "no_problems" not in issues
    for f in found:
        d = f.to_dict()
        assert set(d) == {"issue", "severity", "description", "recommendation", "fix", "proxy_before",
                              "proxy_after", "verdict", "recommended"}
        json.dumps(d, allow_nan=False)
        assert f.to_event().to_dict()["kind"] == "finding"
    assert findings_from_dicts([f.to_dict() for f in found]) == found


def test_missing_summary_and_stats_are_tolerated():
    found = diagnose(stats={}, stats_label="gradient", summary=None, session=Session())
    assert [f.issue for f in found] == ["no_problems"]


def _no_constant(name: str) -> None:
    raise AssertionError(f"{name} written to JSON")


def test_reports_written_atomically_with_nan_as_null(tmp_path: Path):
    means = [1e-3] * L
    means[2] = 1e-7
    means[5] = math.nan
    stats = make_stats(means)
    mlp = [0.2] * L
    mlp[2] = 0.99
    summary = make_summary(mlp=mlp)
    table = make_table(summary)
    s = Session()
    found = diagnose(stats=stats, stats_label="gradient", summary=summary, session=s)
    paths = write_reports(tmp_path, findings=found, stats=stats, stats_label="gradient", summary=summary,
                          table=table, session=s)
    assert paths["gradient_statistics"] == tmp_path / "analysis" / "gradient_statistics.json"
    text_stats = paths["gradient_statistics"].read_text()
    text_diag = paths["gradient_diagnosis"].read_text()
    st = json.loads(text_stats, parse_constant=_no_constant)  # NaN / Infinity would raise
    json.loads(text_diag, parse_constant=_no_constant)
    assert st["label"] == "gradient" and st["num_layers"] == L
    assert st["layers"][5]["layer"]["mean"] is None
    assert st["mean_ratio"] == pytest.approx(1e4)
    assert st["mean_range"] == [pytest.approx(1e-7), pytest.approx(1e-3)]
    assert st["norm_ratio"] == pytest.approx(1e4)
    assert st["ratios"]["mlp"]["mean"]["min_layer"] == 2
    assert 5 in st["ratios"]["layer"]["mean"]["ignored_layers"]
    dg = json.loads(text_diag)
    assert [f["issue"] for f in dg["diagnosis"]] == [f.issue for f in found]
    ext = dg["extreme_layers"]
    assert len(ext) == 1
    e = ext[0]
    assert (e["layer"], e["block"], e["rate"], e["pruned"], e["groups"]) == (2, "mlp", 0.99, 99, 100)
    assert e["gradient"]["mlp"]["mean"] == pytest.approx(1e-7)
    imp = table[(table.layer_idx == 2) & (table.group_type == "mlp")]["importance"]
    assert e["importance"]["importance_total"] == pytest.approx(imp.sum())
    assert e["importance"]["importance_mean"] == pytest.approx(imp.mean())
    assert dg["mean_ratio"] == pytest.approx(1e4)
    # passing the analysis folder itself also works (no analysis/analysis)
    paths2 = write_reports(tmp_path / "analysis", findings=found, stats=stats, stats_label="gradient",
                           summary=summary, table=None, session=s)
    assert paths2["gradient_diagnosis"] == tmp_path / "analysis" / "gradient_diagnosis.json"
    assert not (tmp_path / "analysis" / "analysis").exists()
    assert not [p for p in (tmp_path / "analysis").iterdir() if p.name.endswith(".tmp")]


def test_gradient_statistics_and_diagnosis_are_pure_dicts():
    stats = make_stats()
    st = gradient_statistics(stats, "activation")
    assert st["label"] == "activation"
    json.dumps(st, allow_nan=False)
    dg = gradient_diagnosis([], stats, None, None, Session(), stats_label="activation")
    assert dg["extreme_layers"] == [] and dg["diagnosis"] == []


# ------------------------------------------------------------------------------------------- fixes

SESSION_TEXT = """# my experiment: keep this comment
schema_version = 1

[session]
name = "mistral-t0"  # the baseline

[normalization]
# how to normalize
level = "none"  # none | layer | block
method = "zscore"

[pruning]
ratio = 0.2
"""


def test_apply_fix_keeps_comments_and_validates(tmp_path: Path):
    src = tmp_path / "session.toml"
    src.write_text(SESSION_TEXT)
    out = tmp_path / "fixed.toml"
    means = [1e-3] * L
    means[2] = 1e-8
    s = sessions.load(src)
    finding = by_issue(diagnose(stats=make_stats(means), stats_label="gradient", summary=make_summary(),
                                session=s))["gradient_scale_ratio"]
    assert fix_changes(s, finding.fix) == [("normalization.level", "none", "block"),
                                           ("normalization.method", "zscore", "log")]
    new = apply_fix(src, {**finding.fix, "correction.temperature": 1.0}, out, name="mistral-fixed")
    assert new.normalization.level == "block" and new.normalization.method == "log"
    assert new.correction.temperature == 1.0
    assert new.session.name == "mistral-fixed"
    text = out.read_text()
    assert "# my experiment: keep this comment" in text
    assert "# the baseline" in text
    assert "# how to normalize" in text
    assert "# none | layer | block" in text
    assert 'level = "block"' in text
    assert sessions.load(out) == new
    assert src.read_text() == SESSION_TEXT  # the source is untouched


def test_apply_fix_rejects_bad_keys_and_values(tmp_path: Path):
    src = tmp_path / "session.toml"
    src.write_text(SESSION_TEXT)
    out = tmp_path / "fixed.toml"
    with pytest.raises(SessionError) as err:
        apply_fix(src, {"pruning.maxrate": 0.5, "nosection.x": 1}, out)
    assert "pruning.maxrate" in str(err.value) and "nosection.x" in str(err.value)
    with pytest.raises(SessionError) as err2:
        apply_fix(src, {"pruning.max_rate": 1.5}, out)
    assert "pruning.max_rate" in str(err2.value)
    assert not out.exists()


def test_apply_fix_from_results_folder_drops_provenance(tmp_path: Path):
    results = tmp_path / "run"
    results.mkdir()
    sessions.save(Session(), results / "session.toml", extra_tables={"provenance": {"device": "cpu"}})
    new = apply_fix(results, {"pruning.max_rate": 0.5}, tmp_path / "next.toml")
    assert new.pruning.max_rate == 0.5
    data = tomllib.loads((tmp_path / "next.toml").read_text())
    assert "provenance" not in data
