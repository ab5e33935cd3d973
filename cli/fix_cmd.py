"""`prune fix RESULTS [--apply N]`: list diagnosis findings; apply one as a new session and re-run it.

The new session is written next to the results folder as `<name>-fixN.toml` (the comments of the
results' session.toml kept), its results go to `<name>-fixN/`, and the stage cache of the original
run is seeded into the new folder so the importance pass is reused, not recomputed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import tomlkit
from rich.console import Console

from cli.render import JsonRenderer, make_renderer
from cli.signals import StopFlag, stop_on_signals
from prune_core.atomic import write_text
from prune_core.errors import BadInput
from prune_core.results import open_results
from sessions import dumps

MARKERS = {"critical": "[CRIT]", "high": "[HIGH]", "warning": "[WARN]", "info": "[INFO]"}
STYLES = {"critical": "bold red", "high": "red", "warning": "yellow", "info": "cyan"}
REUSABLE_STATE = ("importance", "block_importance", "perplexity", "calibration_tokens.safetensors")


def seed_state(src: Path, dst: Path) -> None:
    """Copy the reusable stage cache of one results folder into another (never the checkpoints)."""
    for name in REUSABLE_STATE:
        a, b = src / "state" / name, dst / "state" / name
        if a.is_dir():
            shutil.copytree(a, b, dirs_exist_ok=True)
        elif a.is_file() and not b.exists():
            b.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(a, b)


def write_fixed_session(results: Path, fix: dict[str, Any], new_name: str, out_path: Path) -> Any:
    """The results' session with `fix` applied and a new name, keeping its comments; no [provenance]."""
    view = open_results(results)
    new = view.session.with_updates({**fix, "session.name": new_name})
    doc = tomlkit.parse((results / "session.toml").read_text(encoding="utf-8"))
    doc.pop("provenance", None)
    write_text(out_path, dumps(new, tomlkit.dumps(doc)))
    return new


def print_findings(console: Console, findings: list[dict[str, Any]], results: Path) -> None:
    if not findings:
        console.print("no findings: the allocation looks healthy")
        return
    for i, f in enumerate(findings, 1):
        sev = str(f.get("severity", "info"))
        console.print(f"{i}. [{STYLES.get(sev, '')}]{MARKERS.get(sev, '[----]')}[/] {f.get('issue')}", highlight=False)
        console.print(f"   {f.get('description', '')}", markup=False, highlight=False)
        console.print(f"   recommendation: {f.get('recommendation', '')}", markup=False, highlight=False)
        fix = f.get("fix") or {}
        if fix:
            keys = ", ".join(f"{k} = {v!r}" for k, v in fix.items())
            console.print(f"   fix: {keys}   (prune fix {results} --apply {i})", markup=False, highlight=False)


def run_fix(results: Path, apply: int | None, json_mode: bool, console: Console) -> int:
    from cli.compare_view import print_comparison
    from prune_core import pipeline
    from prune_core.compare import compare_results

    view = open_results(results)
    findings = view.findings
    if apply is None:
        if json_mode:
            JsonRenderer().emit({"kind": "findings", "results_dir": str(results), "findings": findings})
        else:
            print_findings(console, findings, results)
        return 0
    if not findings:
        raise BadInput(f"{results} has no diagnosis findings to apply", "nothing to fix; see `prune show`")
    if not 1 <= apply <= len(findings):
        raise BadInput(f"--apply {apply} is out of range", f"choose 1..{len(findings)} (run `prune fix {results}`)")
    finding = findings[apply - 1]
    fix = finding.get("fix") or {}
    if not fix:
        raise BadInput(f"finding {apply} ({finding.get('issue')}) has no automatic fix",
                       "follow its recommendation by hand")
    results = Path(results)
    new_name = f"{view.session.session.name}-fix{apply}"
    session_path = results.parent / f"{new_name}.toml"
    new_dir = results.parent / new_name
    new_session = write_fixed_session(results, fix, new_name, session_path)
    seed_state(results, new_dir)
    if not json_mode:
        console.print(f"wrote {session_path} with {', '.join(f'{k} = {v!r}' for k, v in fix.items())}")
    renderer = make_renderer(Console(stderr=json_mode), json_mode)
    flag = StopFlag()
    try:
        with stop_on_signals(flag):
            pipeline.run(new_session, out_dir=new_dir, on_event=renderer, should_stop=flag)
    finally:
        renderer.close()
    cmp = compare_results(results, new_dir)
    if json_mode:
        JsonRenderer().emit({"kind": "comparison", **cmp})
    else:
        print_comparison(console, cmp)
    return 0
