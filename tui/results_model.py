"""View models for the results screen, built from a `RunReport` (`from_report`).

A run, a what-if and a results folder read back (`RunReport.read`, nothing recomputed) all give a
RunReport, so the screen renders one shape whatever it came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prune_core.verify import NOT_RECOMMENDED

SEVERITY_ORDER = {"critical": 0, "high": 1, "warning": 2, "info": 3}
MARKERS = {"critical": "[CRIT]", "high": "[HIGH]", "warning": "[WARN]", "info": "[INFO]"}


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _records(obj: Any) -> list[dict[str, Any]]:
    """DataFrame, list of dicts or dict of columns -> list of row dicts."""
    if obj is None:
        return []
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):
        return list(obj.to_dict("records"))
    if isinstance(obj, dict):
        keys = list(obj)
        n = len(obj[keys[0]]) if keys else 0
        return [{k: obj[k][i] for k in keys} for i in range(n)]
    return [dict(r) for r in obj]


def _num(value: Any, default: float = 0.0) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return f if math.isfinite(f) else default


@dataclass(frozen=True)
class FindingView:
    issue: str
    severity: str
    description: str
    recommendation: str
    fix: dict[str, Any] = field(default_factory=dict)
    verdict: str = "untested"  # the fix tried in a what-if: better | same | worse | smaller | untested

    @property
    def marker(self) -> str:
        return MARKERS.get(self.severity, "[INFO]")

    @property
    def recommended(self) -> bool:
        """A fix the proxy found worse is shown as tried, never offered."""
        return bool(self.fix) and self.verdict not in NOT_RECOMMENDED

    @classmethod
    def from_any(cls, obj: Any) -> FindingView:
        return cls(issue=str(_get(obj, "issue", "")), severity=str(_get(obj, "severity", "info")),
                   description=str(_get(obj, "description", "")),
                   recommendation=str(_get(obj, "recommendation", "")),
                   fix=dict(_get(obj, "fix", None) or {}), verdict=str(_get(obj, "verdict", "untested")))


def serious_findings(findings: list[FindingView]) -> str:
    """"2 critical, 1 high" for the diagnosis' critical and high findings ("" when there are none), so a
    toast about a new allocation can say that it needs a look."""
    counts = [(sev, sum(f.severity == sev for f in findings)) for sev in ("critical", "high")]
    return ", ".join(f"{n} {sev}" for sev, n in counts if n)


def sort_findings(findings: list[Any]) -> list[FindingView]:
    views = [FindingView.from_any(f) for f in findings]
    return sorted(views, key=lambda f: SEVERITY_ORDER.get(f.severity, 9))


@dataclass(frozen=True)
class LayerRow:
    layer: int
    attention_groups: int
    attention_pruned: int
    attention_rate: float
    mlp_groups: int
    mlp_pruned: int
    mlp_rate: float
    params_before: int
    params_after: int

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> LayerRow:
        ag, ap = int(_num(r.get("attention_groups"))), int(_num(r.get("attention_pruned")))
        mg, mp = int(_num(r.get("mlp_groups"))), int(_num(r.get("mlp_pruned")))
        return cls(layer=int(_num(r.get("layer_idx", r.get("layer")))),
                   attention_groups=ag, attention_pruned=ap,
                   attention_rate=_num(r.get("attention_rate"), ap / ag if ag else 0.0),
                   mlp_groups=mg, mlp_pruned=mp, mlp_rate=_num(r.get("mlp_rate"), mp / mg if mg else 0.0),
                   params_before=int(_num(r.get("params_before"))),
                   params_after=int(_num(r.get("params_after"))))


@dataclass(frozen=True)
class AllocationView:
    rows: list[LayerRow]
    target_ratio: float
    achieved_ratio: float
    removed: int
    prunable: int
    reachable: bool = True
    message: str = ""
    proxy: float | None = None  # the proxy loss of this allocation (held-out calibration windows)
    dense_proxy: float | None = None
    final_proxy: float | None = None  # the same windows through the saved model (compensated, distilled)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.rows) or self.prunable

    def ratio_gap(self) -> str:
        """A warning when the achieved ratio misses the target (by over 3 points and 15 %), else ""."""
        gap = self.achieved_ratio - self.target_ratio
        if abs(gap) <= max(0.03, 0.15 * self.target_ratio):
            return ""
        why = self.message or ("the rate limits or protected layers leave too little to remove" if gap < 0
                               else "the groups are coarse: more was removed than asked")
        return (f"achieved {self.achieved_ratio:.1%} is {'below' if gap < 0 else 'above'} the target "
                f"{self.target_ratio:.0%}: {why}")

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.rows) or self.prunable - self.removed

    @classmethod
    def from_summary(cls, summary: Any, info: dict[str, Any]) -> AllocationView:
        rows = [LayerRow.from_record(r) for r in _records(summary)]
        before = sum(r.params_before for r in rows)
        after = sum(r.params_after for r in rows)
        prunable = int(_num(info.get("prunable_parameters"), before))
        removed = int(_num(info.get("removed_parameters"), before - after))
        achieved = _num(info.get("achieved_ratio"), removed / prunable if prunable else 0.0)
        return cls(rows=rows, target_ratio=_num(info.get("target_ratio"), achieved), achieved_ratio=achieved,
                   removed=removed, prunable=prunable, reachable=bool(info.get("reachable", True)),
                   message=str(info.get("message", "") or ""))


@dataclass
class ResultsData:
    """Everything the results screen shows."""

    session: Any
    allocation: AllocationView | None = None
    previous: AllocationView | None = None
    findings: list[FindingView] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, dict[str, list[float]]] | None = None
    stats_label: str = "gradient"
    results_dir: Path | None = None
    from_folder: bool = False
    total_parameters: int | None = None   # the whole model before pruning, when known

    @property
    def totals(self) -> tuple[int, int] | None:
        """(parameters before, after) of the whole model under the current allocation."""
        if not self.total_parameters or self.allocation is None:
            return None
        return self.total_parameters, self.total_parameters - self.allocation.removed


def _allocation_info(metrics: dict[str, Any]) -> dict[str, Any]:
    """Allocation facts from metrics.json ({"ratio": {...}, "parameters": {...}})."""
    ratio = metrics.get("ratio") if isinstance(metrics.get("ratio"), dict) else {}
    params = metrics.get("parameters") if isinstance(metrics.get("parameters"), dict) else {}
    info: dict[str, Any] = {}
    for key, value in (("target_ratio", ratio.get("target")), ("achieved_ratio", ratio.get("achieved")),
                       ("reachable", ratio.get("reachable")), ("message", ratio.get("message")),
                       ("prunable_parameters", params.get("prunable_before")),
                       ("removed_parameters", params.get("removed"))):
        if value is not None:
            info[key] = value
    return info


def from_report(report: Any, *, from_folder: bool = False, previous: AllocationView | None = None,
                results_dir: Path | None = None) -> ResultsData:
    """What the results screen shows of a `RunReport` (a run, a what-if, or a folder read back).

    `previous` is the allocation shown before (a what-if shows both); `results_dir` names the folder
    the results belong to when the report has none (a what-if writes nothing).
    """
    metrics = dict(_get(report, "metrics", {}) or {})
    summary = _get(report, "summary")
    stats = _get(report, "stats") or None
    folder = _get(report, "results_dir") or results_dir
    allocation = AllocationView.from_summary(summary, _allocation_info(metrics)) if summary is not None else None
    proxy = metrics.get("proxy") or {}
    if allocation is not None and isinstance(proxy, dict) and proxy.get("loss") is not None:
        allocation = replace(allocation, proxy=_num(proxy.get("loss")),
                             dense_proxy=_num(proxy.get("dense")) if proxy.get("dense") is not None else None,
                             final_proxy=_num(proxy.get("final")) if proxy.get("final") is not None else None)
    return ResultsData(
        session=_get(report, "session"),
        allocation=allocation,
        previous=previous,
        findings=sort_findings(list(_get(report, "findings", ()) or ())),
        metrics=metrics, stats=stats if isinstance(stats, dict) and stats else None,
        stats_label=str(_get(report, "stats_label", "gradient") or "gradient"),
        results_dir=Path(folder) if folder else None, from_folder=from_folder,
        total_parameters=int(_num((metrics.get("parameters") or {}).get("total_before"))) or None,
    )


def perplexities(metrics: dict[str, Any]) -> tuple[float | None, float | None]:
    """(ppl before, ppl after) from a metrics dict, whichever layout the engine used."""
    def pick(*keys: str) -> float | None:
        for key in keys:
            node: Any = metrics
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, int | float) and math.isfinite(float(node)):
                return float(node)
        return None
    return (pick("perplexity.before.ppl", "ppl_before", "before.ppl"),
            pick("perplexity.after.ppl", "ppl_after", "after.ppl"))
