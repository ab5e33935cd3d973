"""Compare two results folders: per-layer rates, overlap of the pruned groups, perplexity, settings.

`compare_results(a, b)` reads each folder's `analysis/global_group_table.csv` (the pruned groups),
`analysis/pruning_summary_by_layer.csv` (per-layer rates; rebuilt from the table when missing),
`metrics.json` (perplexity before/after, `mask_sha256`, achieved ratio) and `session.toml` (which
settings differ). Missing files are tolerated: the matching entries are None. A file that is there
but cannot be parsed, holds values of the wrong type, or does not match the folder's manifest is
BadInput naming it (exit code 2), never a traceback. The overlap is the
Jaccard index of the pruned (layer, type, index) sets; `identical` says both runs prune exactly
the same groups. `format_comparison()` renders the result as plain text.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from prune_core.allocation.summary import hash_triples
from prune_core.errors import BadInput

Triple = tuple[int, str, int]


_FIX = "re-run that session (`prune run SESSION.toml --out FOLDER`) to rewrite its results"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadInput(f"{path} is not valid JSON ({exc})", _FIX) from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} must hold a JSON object, not {type(data).__name__}", _FIX)
    return data


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BadInput(f"{path} is not a readable CSV table ({exc})", _FIX) from None


def _num(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _ppl(metrics: dict[str, Any], which: str) -> float | None:
    ppl = metrics.get("perplexity")
    if isinstance(ppl, dict):
        entry = ppl.get(which)
        if isinstance(entry, dict) and "ppl" in entry:
            return _num(entry["ppl"])
        if entry is not None and not isinstance(entry, dict):
            return _num(entry)
    return _num(metrics.get(f"ppl_{which}"))


def _as_bool(series: pd.Series) -> pd.Series:
    if series.dtype == bool:
        return series
    return series.astype(str).str.strip().str.lower().isin({"true", "1", "1.0", "yes"})


def pruned_set(table: pd.DataFrame | None) -> set[Triple] | None:
    """The pruned groups of a group table as (layer, "attention"|"mlp", index) triples."""
    if table is None or not {"layer_idx", "group_type", "group_idx", "pruned"} <= set(table.columns):
        return None
    rows = table[_as_bool(table["pruned"])]
    return {(int(r.layer_idx), str(r.group_type), int(r.group_idx))
            for r in rows[["layer_idx", "group_type", "group_idx"]].itertuples(index=False)}


def mask_sha256_of(pruned: set[Triple]) -> str:
    """The allocation's mask hash (prune_core.allocation.summary.mask_sha256) of a pruned set."""
    triples = sorted((layer, 0 if kind == "attention" else 1, idx) for layer, kind, idx in pruned)
    return hash_triples(np.asarray(triples, dtype=np.int64))


def _rates(summary: pd.DataFrame | None, table: pd.DataFrame | None) -> dict[int, dict[str, float | None]]:
    out: dict[int, dict[str, float | None]] = {}
    if summary is not None and "layer_idx" in summary:
        for rec in summary.to_dict("records"):
            out[int(rec["layer_idx"])] = {b: _num(rec.get(f"{b}_rate")) for b in ("attention", "mlp")}
        return out
    if table is not None and {"layer_idx", "group_type", "pruned"} <= set(table.columns):
        pruned = _as_bool(table["pruned"]).astype(float)
        grouped = pruned.groupby([table["layer_idx"], table["group_type"]]).mean()
        for (layer, kind), rate in grouped.items():
            out.setdefault(int(layer), {"attention": None, "mlp": None})[str(kind)] = float(rate)
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _session_values(folder: Path) -> dict[str, Any]:
    path = folder / "session.toml"
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadInput(f"{path} is not a readable session file ({exc})", _FIX) from None
    data.pop("provenance", None)
    return _flatten(data)


def _run(folder: Path) -> dict[str, Any]:
    from prune_core.report import RunReport, is_results_folder, verify_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise BadInput(f"results folder {str(folder)!r} does not exist",
                       "pass two folders written by `prune run` (each holds metrics.json and analysis/)")
    verify_manifest(folder)
    if is_results_folder(folder):
        RunReport.read(folder)  # the same checks as `prune show`: a damaged file is BadInput naming it
    try:
        return _run_checked(folder)
    except BadInput:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as exc:
        raise BadInput(f"{str(folder)!r} holds values of the wrong type ({type(exc).__name__}: {exc})", _FIX) from None


def _run_checked(folder: Path) -> dict[str, Any]:
    metrics = _read_json(folder / "metrics.json")
    table = _read_csv(folder / "analysis" / "global_group_table.csv")
    summary = _read_csv(folder / "analysis" / "pruning_summary_by_layer.csv")
    if metrics == {} and table is None and summary is None:
        raise BadInput(f"{str(folder)!r} holds no metrics.json and no analysis/ tables",
                       "pass a results folder written by `prune run`")
    pruned = pruned_set(table)
    sha = metrics.get("mask_sha256")
    if sha is not None and not isinstance(sha, str):
        raise BadInput(f"{folder / 'metrics.json'}: 'mask_sha256' must be a string", _FIX)
    sha_source = "metrics.json" if sha else None
    if not sha and pruned is not None:
        sha, sha_source = mask_sha256_of(pruned), "global_group_table.csv"
    session = _session_values(folder)
    ratio = metrics.get("ratio")
    return {
        "info": {
            "path": str(folder),
            "name": session.get("session.name") or metrics.get("session") or folder.name,
            "ppl_before": _ppl(metrics, "before"),
            "ppl_after": _ppl(metrics, "after"),
            "mask_sha256": sha,
            "mask_sha256_source": sha_source,
            "achieved_ratio": _num(ratio.get("achieved")) if isinstance(ratio, dict) else None,
            "pruned_groups": len(pruned) if pruned is not None else None,
            "pruned_attention": sum(1 for t in pruned if t[1] == "attention") if pruned is not None else None,
            "pruned_mlp": sum(1 for t in pruned if t[1] == "mlp") if pruned is not None else None,
        },
        "pruned": pruned,
        "rates": _rates(summary, table),
        "session": session,
    }


def _jaccard(a: set[Triple], b: set[Triple]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def _diff(a: float | None, b: float | None) -> float | None:
    return b - a if a is not None and b is not None else None


def compare_results(a: Path, b: Path) -> dict[str, Any]:
    """Compare results folders `a` and `b` (differences are b − a)."""
    ra, rb = _run(Path(a)), _run(Path(b))
    layers = []
    for layer in sorted(set(ra["rates"]) | set(rb["rates"])):
        row: dict[str, Any] = {"layer": layer}
        for block in ("attention", "mlp"):
            va = ra["rates"].get(layer, {}).get(block)
            vb = rb["rates"].get(layer, {}).get(block)
            row[f"{block}_rate_a"] = va
            row[f"{block}_rate_b"] = vb
            row[f"{block}_rate_diff"] = _diff(va, vb)
        layers.append(row)

    pa, pb = ra["pruned"], rb["pruned"]
    overlap: dict[str, Any] | None = None
    if pa is not None and pb is not None:
        overlap = {
            "jaccard": _jaccard(pa, pb),
            "intersection": len(pa & pb),
            "union": len(pa | pb),
            "only_a": len(pa - pb),
            "only_b": len(pb - pa),
        }
        for kind in ("attention", "mlp"):
            ka = {t for t in pa if t[1] == kind}
            kb = {t for t in pb if t[1] == kind}
            overlap[kind] = {"jaccard": _jaccard(ka, kb), "intersection": len(ka & kb), "union": len(ka | kb)}
        identical: bool | None = pa == pb
    else:
        sa, sb = ra["info"]["mask_sha256"], rb["info"]["mask_sha256"]
        identical = (sa == sb) if sa and sb else None

    largest = None
    diffs = [(abs(r[f"{k}_rate_diff"]), r["layer"], k, r[f"{k}_rate_diff"]) for r in layers
             for k in ("attention", "mlp") if r[f"{k}_rate_diff"] is not None]
    if diffs:
        _, layer, kind, d = max(diffs)
        largest = {"layer": layer, "block": kind, "diff": d}

    sa_vals, sb_vals = ra["session"], rb["session"]
    session_diff = {k: [sa_vals.get(k), sb_vals.get(k)] for k in sorted(set(sa_vals) | set(sb_vals))
                    if sa_vals.get(k) != sb_vals.get(k) and k != "session.name"}
    ia, ib = ra["info"], rb["info"]
    return {
        "a": ia,
        "b": ib,
        "layers": layers,
        "largest_rate_diff": largest,
        "overlap": overlap,
        "identical": identical,
        "ppl_before_diff": _diff(ia["ppl_before"], ib["ppl_before"]),
        "ppl_after_diff": _diff(ia["ppl_after"], ib["ppl_after"]),
        "session_diff": session_diff,
    }


def _fmt(v: Any, pct: bool = False, signed: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:+.3f}" if signed else f"{v:.3f}"
    return str(v)


def format_comparison(result: dict[str, Any]) -> str:
    """A plain-text report of `compare_results()` (rates in %, differences in points, b − a)."""
    a, b = result["a"], result["b"]
    lines = [f"A: {a['name']}  ({a['path']})", f"B: {b['name']}  ({b['path']})", ""]
    lines.append(f"{'':18}{'A':>12}{'B':>12}{'B - A':>12}")
    for key, label in (("ppl_before", "PPL before"), ("ppl_after", "PPL after")):
        lines.append(f"{label:18}{_fmt(a[key]):>12}{_fmt(b[key]):>12}{_fmt(result[key + '_diff'], signed=True):>12}")
    lines.append(f"{'achieved ratio':18}{_fmt(a['achieved_ratio'], pct=True):>12}"
                 f"{_fmt(b['achieved_ratio'], pct=True):>12}")
    lines.append(f"{'pruned groups':18}{_fmt(a['pruned_groups']):>12}{_fmt(b['pruned_groups']):>12}")
    lines.append(f"{'mask sha256':18}{(a['mask_sha256'] or '-')[:10]:>12}{(b['mask_sha256'] or '-')[:10]:>12}")
    ov = result["overlap"]
    lines.append("")
    if ov is not None:
        lines.append(f"overlap of pruned groups: Jaccard {ov['jaccard']:.3f} ({ov['intersection']} shared, "
                     f"{ov['only_a']} only in A, {ov['only_b']} only in B); attention {ov['attention']['jaccard']:.3f}, "
                     f"MLP {ov['mlp']['jaccard']:.3f}")
    ident = result["identical"]
    lines.append("identical selection: " + ("yes" if ident else "no" if ident is not None else "unknown"))
    if result["session_diff"]:
        lines.append("settings that differ:")
        for key, (va, vb) in result["session_diff"].items():
            lines.append(f"  {key}: {va!r} -> {vb!r}")
    lines.append("")
    lines.append(f"{'layer':>5}  {'attn A':>7} {'attn B':>7} {'diff':>6}   {'MLP A':>7} {'MLP B':>7} {'diff':>6}")
    for r in result["layers"]:
        lines.append(f"{r['layer']:>5}  {_fmt(r['attention_rate_a'], True):>7} {_fmt(r['attention_rate_b'], True):>7} "
                     f"{_fmt(r['attention_rate_diff'], True, True):>6}   {_fmt(r['mlp_rate_a'], True):>7} "
                     f"{_fmt(r['mlp_rate_b'], True):>7} {_fmt(r['mlp_rate_diff'], True, True):>6}")
    return "\n".join(lines) + "\n"
