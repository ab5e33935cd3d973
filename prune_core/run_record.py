"""What one run's stages produced (`RunRecord`) and the typed report built from it (`build_report`).

Why a module of its own: the pipeline decides *which* stages run; this module only reads what they left
(the values by stage name, their seconds, which came from the cache) and turns it into the one
`RunReport` every front end renders and `RunReport.write` saves — metrics, allocation summary and table,
findings, statistics and provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_core.provenance import base_provenance, device_name, now_iso
from prune_core.report import RunReport
from sessions import Session


@dataclass
class RunRecord:
    """Per stage name: seconds taken, computed or cached, the value and its cache key."""

    seconds: dict[str, float] = field(default_factory=dict)
    cached: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)



def build_report(session: Session, record: RunRecord, results_dir: Path | None, started: str) -> RunReport:
    """The typed report of what this run's stages produced."""
    v = record.values
    mv = v.get("model")
    alloc = v.get("allocation")
    imp = v.get("importance")
    diag = v.get("diagnosis")
    findings = list(diag.findings) if diag is not None else []
    metrics: dict[str, Any] = {"session": session.session.name}
    if alloc is not None and mv is not None:
        removed = int(alloc.removed_parameters)
        metrics["parameters"] = {
            "total_before": mv.total_parameters, "total_after": mv.total_parameters - removed,
            "prunable_before": int(alloc.prunable_parameters),
            "prunable_after": int(alloc.prunable_parameters) - removed, "removed": removed,
        }
        metrics["ratio"] = {"target": alloc.target_ratio, "achieved": alloc.achieved_ratio,
                            "reachable": bool(alloc.reachable), "message": alloc.message}
        metrics["mask_sha256"] = alloc.mask_sha256
    if "proxy" in v:
        metrics["proxy"] = dict(v["proxy"])
    if "proxy_final" in v:  # the model the run hands on: compensated and distilled
        metrics.setdefault("proxy", {})["final"] = float(v["proxy_final"]["loss"])
    ppl = {which: v[f"eval_{which}"] for which in ("before", "after") if f"eval_{which}" in v}
    metrics["perplexity"] = ppl
    if imp is not None:
        metrics["importance"] = {"method": imp.method, "batches": imp.batches, "tokens": imp.tokens,
                                 "stats_label": imp.stats_label, "cache_key": record.keys.get("importance", "")}
    pruned = v.get("surgery")
    if pruned is not None:
        metrics.setdefault("parameters", {})["total_after_surgery"] = int(pruned.report.params_after)
        metrics["compensation"] = {"mode": pruned.compensate, "ridge": session.pruning.ridge,
                                   "error_feedback": session.pruning.error_feedback,
                                   "modules": len(pruned.report.compensated),
                                   "added_bias_parameters": int(pruned.report.added_bias_parameters)}
    distilled = v.get("distill")
    if distilled is not None and distilled.distill:
        metrics["distill"] = dict(distilled.distill)
    metrics["stage_seconds"] = {k: round(s, 4) for k, s in record.seconds.items()}
    metrics["stages_cached"] = sorted(record.cached)
    metrics["findings"] = {sev: sum(1 for f in findings if f.severity == sev)
                           for sev in ("critical", "high", "warning", "info")}
    provenance = _provenance(session, v, started) if mv is not None else {}
    return RunReport(
        session=session.resolved(), metrics=metrics,
        summary=alloc.summary if alloc is not None else None, table=alloc.table if alloc is not None else None,
        findings=tuple(f.to_dict() for f in findings), stats=dict(imp.stats) if imp is not None else {},
        stats_label=imp.stats_label if imp is not None else "gradient", provenance=provenance,
        results_dir=results_dir,
    )


def _provenance(session: Session, v: dict[str, Any], started: str) -> dict[str, Any]:
    mv = v["model"]
    prov = base_provenance()
    prov.update({
        "device": device_name(next(mv.model.parameters()).device),
        "dtype": session.model.dtype,
        "model_id": session.model.id,
        "model_revision": mv.loaded.revision or session.model.revision,
        "model_source": str(mv.loaded.source),
        "model_fingerprint": mv.loaded.fingerprint,
        "data_fingerprint": v["calibration"].fingerprint if "calibration" in v else "",
        "started": started,
        "finished": now_iso(),
    })
    return prov
