"""One output object per command, rendered for humans (Rich) or as JSON: the summary of a run.

Every value read from a results folder is printed as text (`rich.text.Text`, `markup=False`), never
as Rich markup: a path or message holding brackets is shown as it is.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text


def condensed_rates(summary: pd.DataFrame | None) -> list[dict[str, Any]]:
    """Runs of consecutive layers with the same (rounded) attention and MLP rates."""
    if summary is None or summary.empty:
        return []
    rows: list[dict[str, Any]] = []
    for rec in summary.sort_values("layer_idx").itertuples(index=False):
        a, m = round(float(rec.attention_rate) * 100), round(float(rec.mlp_rate) * 100)
        if rows and rows[-1]["attention_pct"] == a and rows[-1]["mlp_pct"] == m and rows[-1]["last"] == rec.layer_idx - 1:
            rows[-1]["last"] = int(rec.layer_idx)
        else:
            rows.append({"first": int(rec.layer_idx), "last": int(rec.layer_idx), "attention_pct": a, "mlp_pct": m})
    return rows


def run_summary(report: Any) -> dict[str, Any]:
    """The one output object of a run (`RunReport.summary_dict()` plus the condensed per-layer rates)."""
    return {**report.summary_dict(), "layers": condensed_rates(report.summary)}


def _plain(console: Console) -> Any:
    def say(text: str) -> None:
        console.print(Text(text), highlight=False)

    return say


def print_summary(console: Console, obj: dict[str, Any]) -> None:
    say = _plain(console)
    p = obj.get("parameters", {})
    r = obj.get("ratio", {})
    table = Table(title="Per-layer pruning (runs of equal rates)", show_lines=False)
    table.add_column("layers", justify="right")
    table.add_column("attention %", justify="right")
    table.add_column("MLP %", justify="right")
    for row in obj.get("layers", []):
        span = f"{row['first']}" if row["first"] == row["last"] else f"{row['first']}–{row['last']}"
        table.add_row(span, str(row["attention_pct"]), str(row["mlp_pct"]))
    console.print(table)
    if p:
        say(f"parameters: {p.get('total_before', 0):,} → {p.get('total_after', 0):,} "
                      f"(prunable {p.get('prunable_before', 0):,} → {p.get('prunable_after', 0):,})")
    if r:
        line = Text(f"ratio: target {r.get('target', 0):.1%}, achieved {r.get('achieved', 0):.2%}")
        if not r.get("reachable", True):
            line.append(f"  {r.get('message', '')}", style="yellow")
        console.print(line, highlight=False)
    proxy = obj.get("proxy") or {}
    if proxy.get("loss") is not None:
        say(f"proxy loss: {proxy['loss']:.4f} (dense {proxy.get('dense', float('nan')):.4f}, "
                      f"{proxy.get('windows', 0)} held-out windows)")
        if proxy.get("final") is not None:
            say(f"proxy loss of the saved model: {proxy['final']:.4f} (after compensation and distillation; "
                "the line above masks the removed groups without either)")
    ppl = obj.get("perplexity", {})
    settings = obj.get("perplexity_settings", {})
    if ppl:
        parts = []
        for k in ("before", "after"):
            if ppl.get(k) is not None:
                parts.append(f"{k} {ppl[k]:.3f}")
        any_s = next(iter(settings.values()), {})
        say("perplexity: " + ", ".join(parts)
                      + f"  (dataset {any_s.get('dataset')}, seq_len {any_s.get('seq_len')}, {any_s.get('tokens', 0):,} tokens)")
    f = obj.get("findings", {})
    if f and any(f.values()):
        say("diagnosis: " + ", ".join(f"{n} {k}" for k, n in f.items() if n)
                      + f"  (see `prune fix {obj['results_dir']}`)")
    if obj.get("stages_cached"):
        say(f"reused from cache: {', '.join(obj['stages_cached'])}")
    say(f"mask sha256: {obj.get('mask_sha256', '')[:16]}…")
    console.print(Text.assemble("results: ", (str(obj["results_dir"]), "bold")), highlight=False)
