"""Perplexity before/after pruning smollm2-135m by 20 % for each importance method, with and without
block correction (T = 1) and bias compensation. Writes the "Perplexity at 20 %" section of BENCHMARKS.md.

    python bench/bench_perplexity.py [--samples 16] [--eval-tokens 8192] [--write]

One pipeline Memo per method: its importance pass runs once, and every variant is a what-if that
re-allocates, prunes a copy and evaluates it (as the TUI's what-if does).
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from prune_core import pipeline
from sessions import Session

VARIANTS = {
    "plain": {},
    "T=1": {"correction.temperature": 1.0},
    "bias": {"pruning.compensate": "bias"},
    "T=1 + bias": {"correction.temperature": 1.0, "pruning.compensate": "bias"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--methods", default="taylor,taylor_2nd,wanda")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    rows = []
    before = None
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            base = Session().with_updates({
                "session.name": f"bench-{method}", "model.device": "cpu",
                "data.num_samples": args.samples, "data.seq_len": 128, "data.batch_size": 4,
                "importance.method": method, "pruning.ratio": 0.2,
                "evaluation.seq_len": 512, "evaluation.max_tokens": args.eval_tokens,
            })
            memo = pipeline.Memo()
            t0 = time.perf_counter()
            pipeline.run(base, out_dir=Path(tmp) / method, until="importance", memo=memo, write=False)
            pass_s = time.perf_counter() - t0
            if before is None:
                report = pipeline.run(base, out_dir=Path(tmp) / method, until="eval_before", memo=memo, write=False)
                before = report.perplexity["before"]["ppl"]
            for name, updates in VARIANTS.items():
                variant = base.with_updates({**updates, "evaluation.before": False})
                report = pipeline.run(variant, out_dir=Path(tmp) / method, until="eval_after", memo=memo,
                                      write=False)
                ppl = report.perplexity["after"]["ppl"]
                rows.append((method, name, ppl, report.achieved_ratio, pass_s))
                print(f"{method:10s} {name:11s} PPL {ppl:8.3f}  (ratio {report.achieved_ratio:.2%})", flush=True)
    lines = [
        "## Perplexity at 20 %",
        "",
        f"smollm2-135m (float32, CPU), calibration: {args.samples} × 128 shakespeare tokens (batch 4); "
        f"evaluation: first {args.eval_tokens} tokens of the held-out plays in 512-token windows. "
        f"PPL before pruning: **{before:.3f}**. Reproduce: `python bench/bench_perplexity.py --write`.",
        "",
        "| method | variant | PPL after | achieved ratio | importance pass (s) |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {m} | {v} | {p:.3f} | {r:.2%} | {s:.0f} |" for m, v, p, r, s in rows]
    section = "\n".join(lines) + "\n"
    print(section)
    if args.write:
        path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        pattern = re.compile(r"## Perplexity at 20 %.*?(?=\n## |\Z)", re.S)
        text = pattern.sub(section.rstrip("\n"), text) if pattern.search(text) else text.rstrip() + "\n\n" + section
        path.write_text(text if text.endswith("\n") else text + "\n")


if __name__ == "__main__":
    from prune_core.importance.allocator import keep_freed_memory

    keep_freed_memory()  # what the `prune` process does at its start
    main()
