"""`prune fix RESULTS [--apply N]`: list diagnosis findings; apply one as a session change and re-run it.

Applying a fix is the same in the CLI and the TUI: the session with the fix's keys changed
(`prune_core.fixes.apply_fix`, which refuses keys a fix may not touch) and a pipeline run. The new
session is written next to the results folder as `<name>-fixN.toml` (comments kept), its results go
to `<name>-fixN/`, and the original folder's stage cache is copied there first, so the importance
pass is reused, not recomputed. A fix the proxy found worse is refused unless `--force`, and so is
an existing `<name>-fixN.toml` (an earlier --apply N wrote it, perhaps edited since): `--force`
overwrites it. An interrupted fix run says how to resume it: `prune run <name>-fixN.toml --out <name>-fixN`.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from cli.render import JsonRenderer, make_renderer
from cli.signals import StopFlag, stop_on_signals
from prune_core.errors import BadInput, Interrupted
from prune_core.verify import NOT_RECOMMENDED, WHY_NOT, why_not

MARKERS = {"critical": "[CRIT]", "high": "[HIGH]", "warning": "[WARN]", "info": "[INFO]"}
STYLES = {"critical": "bold red", "high": "red", "warning": "yellow", "info": "cyan"}


def _proxy_line(f: dict[str, Any]) -> str:
    before, after = f.get("proxy_before"), f.get("proxy_after")
    if before is None or after is None:
        return "fix not verified (it needs a new importance pass)"
    word = {"better": "better", "worse": "WORSE: not recommended", "same": "no change",
            "smaller": f"{WHY_NOT['smaller']}: not comparable, not recommended"}.get(f.get("verdict", ""), "")
    return f"proxy loss {before:.4f} → {after:.4f} with this fix ({word})"


def print_findings(console: Console, findings: list[dict[str, Any]], results: Path, report: Any = None) -> None:
    if not findings:
        if report is not None and not report.diagnosis:
            console.print("no diagnosis in this folder (analysis/gradient_diagnosis.json is missing): "
                          "re-run the session to diagnose it", markup=False, highlight=False)
            return
        console.print("no findings: the allocation looks healthy")
        return
    for i, f in enumerate(findings, 1):
        sev = str(f.get("severity", "info"))
        console.print(Text.assemble(f"{i}. ", (MARKERS.get(sev, "[----]"), STYLES.get(sev, "")), f" {f.get('issue')}"),
                      highlight=False)
        console.print(f"   {f.get('description', '')}", markup=False, highlight=False)
        console.print(f"   recommendation: {f.get('recommendation', '')}", markup=False, highlight=False)
        fix = f.get("fix") or {}
        if fix:
            keys = ", ".join(f"{k} = {v!r}" for k, v in fix.items())
            console.print(f"   fix: {keys}   ({_proxy_line(f)})", markup=False, highlight=False)
            if f.get("verdict") not in NOT_RECOMMENDED:
                console.print(f"   apply: prune fix {results} --apply {i}", markup=False, highlight=False)


def run_fix(results: Path, apply: int | None, json_mode: bool, console: Console, force: bool = False) -> int:
    from cli.compare_view import print_comparison
    from cli.output import print_summary, run_summary
    from prune_core import lock, pipeline
    from prune_core.cache import StageCache, state_dir
    from prune_core.compare import compare_results
    from prune_core.fixes import apply_fix
    from prune_core.report import RunReport

    report = RunReport.read(results)
    findings = list(report.findings)
    if apply is None:
        if json_mode:
            JsonRenderer().emit({"kind": "findings", "results_dir": str(results), "findings": findings})
        else:
            print_findings(console, findings, results, report=report)
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
    if finding.get("verdict") in NOT_RECOMMENDED and not force:
        why = why_not(finding.get("verdict"))
        raise BadInput(f"finding {apply}'s fix {why} ({_proxy_line(finding)})",
                       "keep the current settings, or pass --force to apply it anyway")
    results = Path(results)
    new_name = f"{report.session.session.name}-fix{apply}"
    session_path = results.parent / f"{new_name}.toml"
    new_dir = results.parent / new_name
    busy = lock.holder(new_dir)
    if busy is not None:  # before writing its session file or copying stage results into it
        raise lock.locked_message(new_dir, busy)
    replaced = session_path.exists()
    if replaced and not force:  # an earlier --apply wrote it (maybe edited since): never overwritten silently
        resume = shlex.join(["prune", "run", str(session_path), "--out", str(new_dir)])
        raise BadInput(f"{session_path} already exists (written by an earlier `prune fix --apply {apply}`?)",
                       f"run it as it is with `{resume}`, move it away, or pass --force to overwrite it")
    new_session = apply_fix(results, fix, session_path, name=new_name)
    StageCache(state_dir(new_dir)).copy_reusable(StageCache(state_dir(results)))
    if not json_mode:
        console.print(f"{'overwrote' if replaced else 'wrote'} {session_path} with "
                      f"{', '.join(f'{k} = {v!r}' for k, v in fix.items())}", markup=False, highlight=False)
    renderer = make_renderer(Console(stderr=json_mode), json_mode)
    flag = StopFlag()
    try:
        with stop_on_signals(flag):
            fixed = pipeline.run(new_session, out_dir=new_dir, on_event=renderer, should_stop=flag,
                                 session_file=session_path)
    except (Interrupted, KeyboardInterrupt) as exc:  # the fixed session resumes as a plain run
        what = exc.message if isinstance(exc, Interrupted) else ("stopped at once (Ctrl-C pressed again); the "
                                                                  "last periodic checkpoint is kept")
        resume = shlex.join(["prune", "run", str(session_path), "--out", str(new_dir)])
        raise Interrupted(f"{what}; the fixed session is {session_path}", f"run `{resume}` to resume it") from None
    finally:
        renderer.close()
    cmp = compare_results(results, new_dir)
    if json_mode:
        JsonRenderer().emit({"kind": "comparison", **cmp})
    else:
        print_summary(console, run_summary(fixed))
        print_comparison(console, cmp)
    return 0
