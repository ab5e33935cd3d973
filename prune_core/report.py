"""The one typed outcome of a run: `RunReport`, written to and read from a results folder here only.

Every front end renders a `RunReport`: `prune run` / `show` / `compare` / `fix` / `eval`, the TUI's
results screen and `--json`. `RunReport.write(folder)` lays out the folder (every file atomic):

- `session.toml` — the resolved session (every default written out) plus a `[provenance]` table;
- `metrics.json` — parameters before/after, target and achieved ratio, proxy loss, perplexity with
  its settings, seconds per stage, stages reused from the cache, `mask_sha256`;
- `analysis/` — `global_group_table.csv`, `pruning_summary_by_layer.{csv,txt}`,
  `gradient_statistics.json`, `gradient_diagnosis.json`;
- `visualization/gradient_analysis.png` (or `.txt` without matplotlib);
- `model/` (written by the pipeline's save_model stage) and `state/` (the stage cache, `cache.py`).

`RunReport.read(folder)` gives the same object back without recomputing anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from prune_core import atomic
from prune_core.errors import BadInput
from sessions import Session

Stats = dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class RunReport:
    """What a run produced: the numbers, the per-layer allocation, the findings, where things are."""

    session: Session
    metrics: dict[str, Any] = field(default_factory=dict)
    summary: pd.DataFrame | None = None  # one row per layer (allocation.summary)
    table: pd.DataFrame | None = None  # one row per group (the global group table)
    findings: tuple[dict[str, Any], ...] = ()  # Finding.to_dict() each, worst first
    stats: Stats = field(default_factory=dict)  # block -> stat -> [L]
    stats_label: str = "gradient"
    provenance: dict[str, Any] = field(default_factory=dict)
    results_dir: Path | None = None
    diagnosis: dict[str, Any] = field(default_factory=dict)  # gradient_diagnosis.json as written

    # -- the numbers every front end shows ------------------------------------------------------
    @property
    def path(self) -> Path | None:
        return self.results_dir

    @property
    def model_dir(self) -> Path | None:
        if self.results_dir is None:
            return None
        folder = self.results_dir / "model"
        return folder if (folder / "pruning.json").is_file() else None

    @property
    def perplexity(self) -> dict[str, dict[str, Any]]:
        return dict(self.metrics.get("perplexity") or {})

    @property
    def mask_sha256(self) -> str:
        return str(self.metrics.get("mask_sha256", ""))

    @property
    def target_ratio(self) -> float:
        return float((self.metrics.get("ratio") or {}).get("target", 0.0))

    @property
    def achieved_ratio(self) -> float:
        return float((self.metrics.get("ratio") or {}).get("achieved", 0.0))

    @property
    def proxy(self) -> dict[str, Any]:
        return dict(self.metrics.get("proxy") or {})

    @property
    def statistics(self) -> dict[str, Any]:
        from prune_core.diagnosis import gradient_statistics

        return gradient_statistics(self.stats, self.stats_label) if self.stats else {}

    def with_(self, **changes: Any) -> RunReport:
        return replace(self, **changes)

    # -- JSON ------------------------------------------------------------------------------------
    def summary_dict(self) -> dict[str, Any]:
        """The one output object of a run for humans (rendered) and `--json` (printed as is)."""
        m = self.metrics
        ppl = self.perplexity
        return {
            "kind": "summary",
            "results_dir": str(self.results_dir) if self.results_dir else "",
            "parameters": m.get("parameters", {}),
            "ratio": m.get("ratio", {}),
            "proxy": m.get("proxy", {}),
            "perplexity": {k: v.get("ppl") for k, v in ppl.items() if isinstance(v, dict)},
            "perplexity_settings": {k: {"dataset": v.get("dataset"), "seq_len": v.get("seq_len"),
                                        "tokens": v.get("tokens")}
                                    for k, v in ppl.items() if isinstance(v, dict)},
            "mask_sha256": self.mask_sha256,
            "stages_cached": m.get("stages_cached", []),
            "stage_seconds": m.get("stage_seconds", {}),
            "findings": m.get("findings", {}),
            "findings_list": list(self.findings),
            "model_dir": str(self.model_dir) if self.model_dir else "",
        }

    # -- the folder ------------------------------------------------------------------------------
    def write(self, folder: Path) -> RunReport:
        """Write every results file except model/ and state/ (atomically); return the report with its path."""
        from prune_core.allocation import write_summary, write_table_csv
        from prune_core.charts import gradient_panels
        from prune_core.diagnosis import findings_from_dicts, write_reports
        from prune_core.visualize import write_gradient_png

        out = Path(folder)
        analysis = out / "analysis"
        metrics = dict(self.metrics)
        if self.table is not None:
            write_table_csv(self.table, analysis / "global_group_table.csv")
        if self.summary is not None:
            write_summary(self.summary, analysis)
        write_reports(analysis, findings=findings_from_dicts(self.findings), stats=self.stats,
                      stats_label=self.stats_label, summary=self.summary, table=self.table, session=self.session)
        panels = gradient_panels(self.stats, self.stats_label, self.summary, self.table)
        note = write_gradient_png(panels, out / "visualization" / "gradient_analysis.png")
        if note:
            metrics["visualization_note"] = note
        atomic.write_json(out / "metrics.json", metrics)
        session_path = out / "session.toml"
        # a results folder's session.toml is a record: written whole (never merged with an older one)
        atomic.write_text(session_path, _session_text(self.session, self.provenance))
        diagnosis = _read_json(analysis / "gradient_diagnosis.json")
        return replace(self, metrics=metrics, results_dir=out, diagnosis=diagnosis)

    @classmethod
    def read(cls, folder: Path) -> RunReport:
        """A finished run, read back from its folder without recomputing anything."""
        from sessions import load_with_extras

        p = Path(folder)
        if not p.is_dir():
            raise BadInput(f"results folder {str(p)!r} does not exist",
                           "pass the folder `prune run` printed at the end")
        if not is_results_folder(p):
            raise BadInput(f"{str(p)!r} holds no session.toml and metrics.json, so it is not a finished results "
                           "folder", "pass the folder `prune run` printed at the end (or run the session first)")
        session, extras = load_with_extras(p / "session.toml")
        analysis = p / "analysis"
        table = _read_csv(analysis / "global_group_table.csv")
        summary = _read_csv(analysis / "pruning_summary_by_layer.csv")
        statistics = _read_json(analysis / "gradient_statistics.json")
        diagnosis = _read_json(analysis / "gradient_diagnosis.json")
        stats, label = ({}, "gradient")
        if statistics:
            from prune_core.diagnosis import stats_from_statistics

            stats, label = stats_from_statistics(statistics)
        return cls(
            session=session, metrics=_read_json(p / "metrics.json"), summary=summary, table=table,
            findings=tuple(diagnosis.get("diagnosis", []) or []), stats=stats, stats_label=label,
            provenance=dict(extras.get("provenance", {})), results_dir=p, diagnosis=diagnosis,
        )


def is_results_folder(path: Path) -> bool:
    """A folder a finished run wrote (session.toml and metrics.json both present)."""
    p = Path(path)
    return p.is_dir() and (p / "session.toml").is_file() and (p / "metrics.json").is_file()


def _session_text(session: Session, provenance: dict[str, Any]) -> str:
    from sessions import dumps

    return dumps(session.resolved(), extra_tables={"provenance": provenance} if provenance else None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not valid JSON ({exc})", "re-run the session to rewrite its results") from None


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise BadInput(f"{path} is not a readable CSV table ({exc})",
                       "re-run the session to rewrite its results") from None
