"""The results folder: what a finished run leaves behind, and how to read it back without recomputing.

Layout of `<output_dir>/<name>/` (or `--out DIR`):
- `session.toml` — the resolved session (every default written out) plus a `[provenance]` table;
- `metrics.json` — parameters before/after, achieved ratio, perplexity with its settings, time per
  stage, `mask_sha256`;
- `analysis/` — `global_group_table.csv`, `pruning_summary_by_layer.{csv,txt}`,
  `gradient_statistics.json`, `gradient_diagnosis.json`;
- `visualization/` — `gradient_analysis.png` (or `.txt` without matplotlib);
- `model/` — the pruned model (when `[output] save_model`);
- `state/` — calibration token ids, stage cache, checkpoints of an interrupted pass.
Every file is written atomically.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from prune_core import atomic
from prune_core.errors import BadInput


def write_results(wb: Any, metrics: dict[str, Any]) -> None:
    """Write every results file of a workbench whose allocation (and diagnosis) is done."""
    from prune_core.allocation import write_summary, write_table_csv
    from prune_core.charts import gradient_panels
    from prune_core.diagnosis import write_reports
    from prune_core.visualize import write_gradient_png
    from sessions import save

    out = wb.results_dir
    analysis = out / "analysis"
    alloc = wb.allocation
    write_table_csv(alloc.table, analysis / "global_group_table.csv")
    write_summary(alloc.summary, analysis)
    imp = wb.importance
    write_reports(analysis, findings=wb.findings, stats=imp.stats, stats_label=imp.stats_label,
                  summary=alloc.summary, table=alloc.table, session=wb.session)
    panels = gradient_panels(imp.stats, imp.stats_label, alloc.summary, alloc.table)
    note = write_gradient_png(panels, out / "visualization" / "gradient_analysis.png")
    if note:
        metrics["visualization_note"] = note
    atomic.write_json(out / "metrics.json", metrics)
    session_path = out / "session.toml"
    if session_path.exists():
        session_path.unlink()  # a results folder's session.toml is always rewritten whole
    save(wb.session.resolved(), session_path, extra_tables={"provenance": wb.provenance()})


@dataclass
class ResultsView:
    """A finished run, read back from its folder."""

    path: Path
    session: Any
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    table: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    statistics: dict[str, Any] = field(default_factory=dict)
    diagnosis: dict[str, Any] = field(default_factory=dict)

    @property
    def findings(self) -> list[dict[str, Any]]:
        return list(self.diagnosis.get("diagnosis", []))


def is_results_dir(path: Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "session.toml").is_file() and (p / "metrics.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path} is not valid JSON ({exc})", "re-run the session to rewrite its results") from None


def open_results(path: Path) -> ResultsView:
    """Load a results folder (session, metrics, tables, diagnosis) without recomputing anything."""
    from sessions import load_with_extras

    p = Path(path)
    if not p.is_dir():
        raise BadInput(f"results folder {str(p)!r} does not exist", "pass the folder `prune run` printed at the end")
    if not (p / "session.toml").is_file():
        raise BadInput(f"{str(p)!r} holds no session.toml, so it is not a results folder",
                       "pass the folder `prune run` printed at the end")
    session, extras = load_with_extras(p / "session.toml")
    analysis = p / "analysis"
    table = pd.read_csv(analysis / "global_group_table.csv") if (analysis / "global_group_table.csv").is_file() else None
    summary_path = analysis / "pruning_summary_by_layer.csv"
    summary = pd.read_csv(summary_path) if summary_path.is_file() else None
    return ResultsView(
        path=p,
        session=session,
        provenance=extras.get("provenance", {}),
        metrics=_read_json(p / "metrics.json"),
        table=table,
        summary=summary,
        statistics=_read_json(analysis / "gradient_statistics.json"),
        diagnosis=_read_json(analysis / "gradient_diagnosis.json"),
    )
