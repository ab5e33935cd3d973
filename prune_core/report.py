"""The one typed outcome of a run: `RunReport`, written to and read from a results folder here only.

Every front end renders a `RunReport`: `prune run` / `show` / `compare` / `fix` / `eval`, the TUI's
results screen and `--json`. `RunReport.write(folder)` lays out the folder (every file atomic):

- `session.toml` — the resolved session (every default written out) plus a `[provenance]` table;
- `metrics.json` — parameters before/after, target and achieved ratio, proxy loss, perplexity with
  its settings, seconds per stage, stages reused from the cache, `mask_sha256`;
- `analysis/` — `global_group_table.csv`, `pruning_summary_by_layer.{csv,txt}`,
  `gradient_statistics.json`, `gradient_diagnosis.json`;
- `visualization/gradient_analysis.png` (or `.txt` without matplotlib);
- `model/` (written by the pipeline's save_model stage) and `state/` (the stage cache, `cache.py`);
- `manifest.json` — the size and sha256 of every file above except `state/`, written last.

The folder changes as a whole. A run writes its results (and `model/`) into `<folder>/.staging/`;
`write` then swaps the staged set in: the old entries move to `.previous/`, the new ones into place,
and `manifest.json` is replaced last (one atomic rename: the commit point). `recover()` (called before
every write and read) finishes or rolls back a swap a crash interrupted, so a reader sees the old
complete set or the new one, never a mix; `read` refuses a folder whose files do not match their
manifest. `check_out_folder()` refuses to write into a folder whose files are not a results folder's
own (a `--out .` holding the user's session.toml).

`RunReport.read(folder)` gives the same object back without recomputing anything, except that its
session's `model.trust_remote_code` is always false (trust comes only from the user's own session
file, never from a folder that may be someone else's); every problem of a damaged folder (bad TOML/JSON/CSV, wrong types, a mismatching manifest) is `BadInput`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from prune_core import atomic
from prune_core.digest import file_sha256
from prune_core.errors import BadInput
from sessions import Session

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "prune-results"
STAGING = ".staging"
PREVIOUS = ".previous"
# the entries a run replaces as one set (manifest.json is replaced last, the commit point)
RESULT_ENTRIES = ("session.toml", "metrics.json", "analysis", "visualization", "model")
# every name a results folder may hold that prune itself writes (`check_out_folder`); a hidden name
# (lock, staging, temporary files) is always a tool's own
OWN_ENTRIES = (*RESULT_ENTRIES, MANIFEST, "state", "tune", "events.ndjson", "run.lock")
# files up to this size are checked by sha256 on every read; larger ones (model weights) by size
VERIFY_SHA_BELOW = 64 << 20
_DAMAGED_FIX = "re-run the session (`prune run SESSION.toml --out FOLDER`) to rewrite its results"

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
        """Write every results file except state/ into the staging folder (where the pipeline's
        save_model stage put model/), then swap the whole set in; return the report with its path."""
        from prune_core.allocation import write_summary, write_table_csv
        from prune_core.charts import gradient_panels
        from prune_core.diagnosis import findings_from_dicts, write_reports
        from prune_core.visualize import write_gradient_png

        final = Path(folder)
        recover(final)
        out = staging_dir(final)
        for name in RESULT_ENTRIES:  # only this run's model/ may already be staged
            if name != "model":
                _remove(out / name)
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
        _swap_in(final, out)
        return replace(self, metrics=metrics, results_dir=final, diagnosis=diagnosis)

    @classmethod
    def read(cls, folder: Path) -> RunReport:
        """A finished run, read back from its folder without recomputing anything.

        Every problem of a damaged folder is BadInput naming the file: unreadable TOML/JSON/CSV,
        values of the wrong type, files that do not match the folder's manifest.
        """
        p = Path(folder)
        if p.is_file():
            hint = (f"to run the session, use `prune run {p}`" if p.suffix == ".toml"
                    else "pass the folder `prune run` printed at the end")
            raise BadInput(f"{str(p)!r} is a file, not a results folder", hint)
        if not p.is_dir():
            raise BadInput(f"results folder {str(p)!r} does not exist",
                           "pass the folder `prune run` printed at the end")
        with contextlib.suppress(OSError):  # a read-only folder is read as it is
            recover(p)
        if not is_results_folder(p):
            raise BadInput(f"{str(p)!r} holds no session.toml and metrics.json, so it is not a finished results "
                           "folder", "pass the folder `prune run` printed at the end (or run the session first)")
        verify_manifest(p)
        try:
            return cls._read_checked(p)
        except BadInput:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError,
                UnicodeError, OSError, MemoryError) as exc:
            raise BadInput(f"{str(p)!r} is damaged ({type(exc).__name__}: {exc})", _DAMAGED_FIX) from None

    @classmethod
    def _read_checked(cls, p: Path) -> RunReport:
        session, extras = _read_session(p / "session.toml")
        # trust is never inherited from a folder: re-using this session (tui RESULTS, fix) runs no model code
        session = session.with_updates({"model.trust_remote_code": False})
        analysis = p / "analysis"
        table = _read_csv(analysis / "global_group_table.csv",
                          {"layer_idx": "int", "group_type": "str", "group_idx": "int", "pruned": "bool"})
        summary = _read_csv(analysis / "pruning_summary_by_layer.csv",
                            {"layer_idx": "int", "attention_rate": "num", "mlp_rate": "num"})
        statistics = _read_json(analysis / "gradient_statistics.json")
        diagnosis = _read_json(analysis / "gradient_diagnosis.json")
        findings = diagnosis.get("diagnosis", []) or []
        if not isinstance(findings, list) or not all(isinstance(f, dict) for f in findings):
            raise BadInput(f"{analysis / 'gradient_diagnosis.json'}: \"diagnosis\" must be a list of findings",
                           _DAMAGED_FIX)
        for f in findings:
            if not isinstance(f.get("fix") or {}, dict):
                raise BadInput(f"{analysis / 'gradient_diagnosis.json'}: a finding's \"fix\" must be a table",
                               _DAMAGED_FIX)
        stats, label = ({}, "gradient")
        if statistics:
            from prune_core.diagnosis import stats_from_statistics

            try:
                stats, label = stats_from_statistics(statistics)
            except (TypeError, ValueError, AttributeError) as exc:
                raise BadInput(f"{analysis / 'gradient_statistics.json'} has values of the wrong type ({exc})",
                               _DAMAGED_FIX) from None
        metrics = _read_json(p / "metrics.json")
        _check_metrics(metrics, p / "metrics.json")
        provenance = extras.get("provenance", {})
        return cls(
            session=session, metrics=metrics, summary=summary, table=table,
            findings=tuple(findings), stats=stats, stats_label=label,
            provenance=dict(provenance) if isinstance(provenance, dict) else {}, results_dir=p,
            diagnosis=diagnosis,
        )


def is_results_folder(path: Path) -> bool:
    """A folder a finished run wrote (session.toml and metrics.json both present)."""
    p = Path(path)
    return p.is_dir() and (p / "session.toml").is_file() and (p / "metrics.json").is_file()


def _session_text(session: Session, provenance: dict[str, Any]) -> str:
    from sessions import dumps

    return dumps(session.resolved(), extra_tables={"provenance": provenance} if provenance else None)


def _read_session(path: Path) -> tuple[Session, dict[str, Any]]:
    from sessions import load_with_extras

    try:
        return load_with_extras(path)
    except BadInput as exc:
        raise BadInput(f"{path} is not a valid session record ({exc.message})", _DAMAGED_FIX) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError, OSError, RecursionError) as exc:
        raise BadInput(f"{path} is not a readable session file ({exc})", _DAMAGED_FIX) from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise BadInput(f"{path} is not valid JSON ({exc})", _DAMAGED_FIX) from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} must hold a JSON object, not {type(data).__name__}", _DAMAGED_FIX)
    return data


def _read_csv(path: Path, columns: dict[str, str]) -> pd.DataFrame | None:
    """A CSV table with at least `columns`, each of its kind ("int", "num", "bool", "str")."""
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise BadInput(f"{path} is not a readable CSV table ({exc})", _DAMAGED_FIX) from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise BadInput(f"{path} lacks the column(s) {', '.join(missing)}", _DAMAGED_FIX)
    for col, kind in columns.items():
        values = frame[col]
        if kind == "int" and not pd.api.types.is_integer_dtype(values):
            raise BadInput(f"{path}: column {col!r} must hold whole numbers", _DAMAGED_FIX)
        if kind == "num" and not pd.api.types.is_numeric_dtype(values):
            raise BadInput(f"{path}: column {col!r} must hold numbers", _DAMAGED_FIX)
        if kind == "bool" and not (pd.api.types.is_bool_dtype(values)
                                   or values.astype(str).str.lower().isin({"true", "false", "1", "0"}).all()):
            raise BadInput(f"{path}: column {col!r} must hold true/false", _DAMAGED_FIX)
    return frame


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))


def _check_metrics(m: dict[str, Any], path: Path) -> None:
    """The values renderers format as numbers are numbers (BadInput naming the key otherwise)."""
    def bad(key: str, what: str) -> BadInput:
        return BadInput(f"{path}: {key!r} must be {what}", _DAMAGED_FIX)

    for key in ("parameters", "ratio", "proxy", "perplexity", "findings", "stage_seconds", "importance",
                "compensation"):
        if key in m and not isinstance(m[key], dict):
            raise bad(key, "a JSON object")
    for k, v in (m.get("parameters") or {}).items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(f"parameters.{k}", "a whole number")
    ratio = m.get("ratio") or {}
    for k in ("target", "achieved"):
        if k in ratio and not _is_num(ratio[k]):
            raise bad(f"ratio.{k}", "a finite number")
    for k in ("loss", "dense", "final"):
        v = (m.get("proxy") or {}).get(k)
        if v is not None and not isinstance(v, int | float):
            raise bad(f"proxy.{k}", "a number")
    for which, entry in (m.get("perplexity") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("ppl", 0.0), int | float) \
                or not isinstance(entry.get("tokens", 0), int):
            raise bad(f"perplexity.{which}", "an object with a numeric ppl and whole-number tokens")
    for k, v in (m.get("findings") or {}).items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad(f"findings.{k}", "a whole number")
    if not isinstance(m.get("mask_sha256", ""), str):
        raise bad("mask_sha256", "a string")
    if not isinstance(m.get("stages_cached", []), list):
        raise bad("stages_cached", "a list")


# ---------------------------------------------------------------------------------------------- the folder as a whole
def staging_dir(folder: Path) -> Path:
    """Where a run writes its results (and model/) before they are swapped in."""
    return Path(folder) / STAGING


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _files(root: Path, names: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for name in names:
        entry = root / name
        if entry.is_file():
            out.append(entry)
        elif entry.is_dir():
            out.extend(sorted(p for p in entry.rglob("*") if p.is_file() and not p.name.startswith(".")))
    return out


def _manifest_of(root: Path) -> dict[str, Any]:
    files = {p.relative_to(root).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
             for p in _files(root, RESULT_ENTRIES)}
    return {"format": MANIFEST_FORMAT, "version": 1, "files": files}


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(final: Path, stage: Path, names: tuple[str, ...] = RESULT_ENTRIES,
             manifest: dict[str, Any] | None = None) -> None:
    """Replace `names` of `final` by those staged in `stage`; `manifest.json` is replaced last."""
    atomic.write_json(stage / MANIFEST, manifest if manifest is not None else _manifest_of(stage))
    previous = final / PREVIOUS
    _remove(previous)
    previous.mkdir(parents=True)
    for name in names:
        if (final / name).exists():
            os.replace(final / name, previous / name)
    for name in names:
        if (stage / name).exists():
            os.replace(stage / name, final / name)
    _fsync_dir(final)
    os.replace(stage / MANIFEST, final / MANIFEST)  # the commit point
    _fsync_dir(final)
    _remove(previous)
    _remove(stage)


def _load_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, OSError) as exc:
        raise BadInput(f"{path} is not valid JSON ({exc})", _DAMAGED_FIX) from None
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(files, dict) \
            or not all(isinstance(v, dict) for v in files.values()):
        raise BadInput(f"{path} is not a results manifest", _DAMAGED_FIX)
    return doc


def recorded_sha256(folder: Path, name: str) -> str | None:
    """The sha256 the folder's manifest records for the file `name` (e.g. "model/model.safetensors");
    None when there is no manifest, it is damaged, or it does not list the file."""
    try:
        doc = _load_manifest(folder)
    except BadInput:
        return None
    entry = doc["files"].get(name) if doc is not None else None
    sha = entry.get("sha256") if entry is not None else None
    return sha if isinstance(sha, str) else None


def manifest_problems(folder: Path, *, full: bool = False) -> list[str]:
    """Files of `folder` that do not match its manifest (empty when it matches or there is none).

    Files below VERIFY_SHA_BELOW bytes are compared by sha256, larger ones by size (`full`: all by sha256).
    """
    folder = Path(folder)
    doc = _load_manifest(folder)
    if doc is None:
        return []
    problems = []
    listed = doc["files"]
    for rel, want in listed.items():
        path = folder / rel
        if ".." in Path(rel).parts or not path.is_file():
            problems.append(f"{rel} is missing")
            continue
        size = path.stat().st_size
        if size != want.get("size"):
            problems.append(f"{rel} has changed (size {size}, manifest {want.get('size')})")
        elif (full or size < VERIFY_SHA_BELOW) and file_sha256(path) != want.get("sha256"):
            problems.append(f"{rel} has changed (its sha256 differs from the manifest)")
    for path in _files(folder, RESULT_ENTRIES):
        rel = path.relative_to(folder).as_posix()
        if rel not in listed:
            problems.append(f"{rel} is not part of the run that wrote this folder")
    return problems


def verify_manifest(folder: Path) -> None:
    """BadInput naming the files of `folder` that do not match its manifest."""
    problems = manifest_problems(folder)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BadInput(f"the results in {str(folder)!r} do not match their manifest.json ({shown}): the folder "
                       "was changed after its run finished", _DAMAGED_FIX)


def recover(folder: Path) -> None:
    """Finish or roll back a swap a crash interrupted (a `.previous/` folder is left): afterwards the
    folder holds one complete set of results, the new one if its manifest was committed, else the old."""
    folder = Path(folder)
    previous = folder / PREVIOUS
    if not previous.is_dir():
        return
    try:
        committed = _load_manifest(folder) is not None and not manifest_problems(folder)
    except BadInput:
        committed = False
    if not committed:
        for name in RESULT_ENTRIES:
            if (previous / name).exists() or (folder / name).exists():
                _remove(folder / name)
                if (previous / name).exists():
                    os.replace(previous / name, folder / name)
        _fsync_dir(folder)
    _remove(previous)


def prepare_folder(folder: Path) -> None:
    """Before a writing run: finish an interrupted swap and clear what an interrupted run staged."""
    folder = Path(folder)
    if folder.is_dir():
        recover(folder)
        _remove(staging_dir(folder))


def commit_model(folder: Path) -> None:
    """Swap a staged model/ in alone (a run that saved the model but did not rewrite the results)."""
    folder = Path(folder)
    stage = staging_dir(folder)
    if not (stage / "model").is_dir():
        return
    recover(folder)
    doc = _load_manifest(folder)
    files = {k: v for k, v in (doc["files"] if doc else _manifest_of(folder)["files"]).items()
             if not k.startswith("model/")}
    files.update({p.relative_to(stage).as_posix(): {"size": p.stat().st_size, "sha256": file_sha256(p)}
                  for p in _files(stage, ("model",))})
    _swap_in(folder, stage, ("model",), {"format": MANIFEST_FORMAT, "version": 1, "files": files})


def check_out_folder(folder: Path) -> None:
    """Refuse (BadInput) to write results into a folder that holds files a results folder does not own.

    A results folder (session.toml + metrics.json) may hold anything else besides (it is never
    touched); any other existing folder may hold only prune's own entries (an interrupted first
    run's `state/`, hidden lock and staging files).
    """
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise BadInput(f"results path {str(p)!r} is a file", "choose another --out folder or session name")
    if not p.is_dir() or is_results_folder(p):
        return
    try:
        names = sorted(e.name for e in p.iterdir())
    except OSError as exc:
        raise BadInput(f"cannot list the results folder {str(p)!r} ({exc.strerror})",
                       "check its permissions, or choose another --out folder") from None
    ours = {"state", "tune", "events.ndjson", "run.lock"}
    foreign = [n for n in names if n not in ours and not n.startswith(".")]
    if foreign:
        shown = ", ".join(foreign[:5]) + (", …" if len(foreign) > 5 else "")
        raise BadInput(f"{str(p)!r} is not a results folder and already holds files prune did not write "
                       f"({shown}); writing the results there could overwrite them",
                       "pass an empty or new folder to --out (or a results folder of an earlier run)")
