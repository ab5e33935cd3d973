"""Quality of the pruned model (issue 11): held-out perplexity in-domain and on another domain after pruning
smollm2-135m by 20 % and 40 % of the prunable parameters, through the same pipeline users run.

    .venv/bin/python bench/bench_quality.py [--quick] [--write] [--ratios 0.2,0.4] [--configs a,b] [--tune 60]

Protocol (the issue's): calibration 32 × 128-token shakespeare windows (seed 0, batch 4); perplexity of
the first `--eval-tokens` (32,768; --quick: 8,192) tokens of the shakespeare evaluation split (held-out
plays) and of the `wikipedia` evaluation split (other domain; never a calibration source), 512-token
windows. Every configuration is a session run with `pipeline.run(…, memo=…)`, so each importance pass
runs once and every variant is a what-if; `tuned` is `prune tune` (proxy-scored knob search) from the
recommended session. Baselines in our own code: random groups, uniform per-layer L2 magnitude (the
`magnitude` method, MLP channels, same rate per layer) and LLM-Pruner-like (element-wise taylor_2nd,
MLP channels of layers 3..L-2, same rate per layer). Both proxies of every configuration are recorded
(the allocation's, removed groups masked, and the saved model's, after compensation and distillation)
with their Spearman rank correlations with the held-out perplexities.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prune_core import atomic, pipeline
from prune_core.tune import tune
from sessions import Session
from sessions.presets import RECOMMENDED

DOMAINS = ("shakespeare", "wikipedia")
SECTION = "## Quality at 20 % and 40 %"
LLM_PRUNER = {"importance.method": "taylor_2nd", "pruning.blocks": "mlp", "pruning.allocation": "uniform",
              "pruning.protect_layers": [0, 1, 2, -1], "pruning.compensate": "none"}
CONFIGS: dict[str, dict[str, Any]] = {
    "taylor global (old quick start)": {"importance.method": "taylor"},
    "taylor global + bias": {"importance.method": "taylor", "pruning.compensate": "bias"},
    "taylor global + reconstruct": {"importance.method": "taylor", "pruning.compensate": "reconstruct"},
    "taylor_2nd global": {"importance.method": "taylor_2nd"},
    "wanda global": {"importance.method": "wanda"},
    "wanda recommended": {**RECOMMENDED, "importance.method": "wanda"},
    "baseline: LLM-Pruner-like": LLM_PRUNER,
    "baseline: uniform L2 magnitude (MLP)": {"importance.method": "magnitude", "pruning.blocks": "mlp",
                                             "pruning.allocation": "uniform"},
    "baseline: random groups": {"importance.method": "magnitude", "random": True},
    "recommended (quick start)": dict(RECOMMENDED),
    "recommended with Shakespeare windows only": {**RECOMMENDED, "data.generated_samples": 0},
    "recommended without distillation": {**RECOMMENDED, "distill.steps": 0},
    "previous recommended (no generated windows or error feedback or distillation; ridge 1)": {
        **RECOMMENDED, "data.generated_samples": 0, "pruning.error_feedback": 0.0, "pruning.ridge": 1.0,
        "distill.steps": 0},
    "baseline: LLM-Pruner-like + the same distillation": {
        **LLM_PRUNER, **{k: v for k, v in RECOMMENDED.items() if k.startswith(("distill.", "data."))}},
    "recommended + bias": {**RECOMMENDED, "pruning.compensate": "bias"},
    "recommended + tune": {**RECOMMENDED, "tune": True},
}
QUICK = ["taylor global (old quick start)", "baseline: LLM-Pruner-like", "recommended (quick start)"]


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.node() or 'host'}: {platform.machine()} {os.cpu_count()} CPUs, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), load {load:.1f}")


def spearman(a: list[float], b: list[float]) -> float:
    if len(a) < 3:
        return float("nan")
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def randomized(memo: pipeline.Memo, seed: int) -> None:
    """Replace the memo's latest importance result by random scores (the random-groups baseline)."""
    result = memo.latest("importance")
    rng = np.random.default_rng(seed)
    att = torch.from_numpy(rng.random(tuple(result.attention.shape)))
    mlp = torch.from_numpy(rng.random(tuple(result.mlp.shape)))
    memo.replace_latest("importance", replace(result, attention=att, mlp=mlp, first_order=None))


def write_section(rows: list[dict[str, Any]], dense: dict[str, float], args: argparse.Namespace, eval_tokens: int,
                  started: str, total: int, write: bool) -> str:
    """The BENCHMARKS.md section for the rows so far (marked partial until all `total` rows are in)."""
    rho = {d: spearman([r["proxy"] for r in rows], [r[d] for r in rows]) for d in DOMAINS}
    rho_final = {d: spearman([r["final"] for r in rows], [r[d] for r in rows]) for d in DOMAINS}
    partial = "" if len(rows) >= total else f" **Partial: {len(rows)} of {total} rows so far.**"
    lines = [
        SECTION, "",
        f"smollm2-135m (float32, CPU), calibration {args.samples} × 128 shakespeare tokens (seed 0, batch 4, "
        f"4 more windows held out for the proxy); perplexity of the saved-model equivalent on the first "
        f"{eval_tokens:,} tokens of the shakespeare evaluation split (in-domain) and of `wikipedia` (other "
        f"domain), 512-token windows. Dense: **{dense['shakespeare']:.2f}** / **{dense['wikipedia']:.2f}**. "
        f"Every row is a session run through `pipeline.run`; `recommended` is sessions/presets.py "
        f"(what `prune new` and the quick start use); `tuned` is `prune tune` ({args.tune:.0f} s) from it.",
        f"Spearman rank correlation with held-out PPL over these rows: of the proxy loss (the allocation's, "
        f"removed groups masked, what every what-if sees) in-domain **{rho['shakespeare']:.2f}**, other domain "
        f"**{rho['wikipedia']:.2f}**; of the saved model's proxy loss (the same windows after compensation and "
        f"distillation) in-domain **{rho_final['shakespeare']:.2f}**, other domain "
        f"**{rho_final['wikipedia']:.2f}**.{partial}",
        f"Measured from {started} on {machine()}. Reproduce: `.venv/bin/python bench/bench_quality.py --write`.", "",
        "| ratio | configuration | removed | PPL shakespeare | PPL wikipedia | proxy loss | saved model's proxy "
        "| notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {r['ratio']:.0%} | {r['config']} | {r['removed']:.1%} | {r['shakespeare']:.2f} | "
              f"{r['wikipedia']:.2f} | {r['proxy']:.4f} | {r['final']:.4f} | {r['note']} |" for r in rows]
    section = "\n".join(lines) + "\n"
    if write:
        path = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
        text = pattern.sub(lambda _m: section.rstrip("\n"), text) if pattern.search(text) \
            else text.rstrip() + "\n\n" + section
        atomic.write_text(path, text if text.endswith("\n") else text + "\n")
    return section


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="8,192 evaluation tokens, 20 %% only, three configurations")
    ap.add_argument("--eval-tokens", type=int, default=None)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--ratios", default=None)
    ap.add_argument("--configs", default=None, help="comma-separated configuration names (default: all; see CONFIGS)")
    ap.add_argument("--tune", type=float, default=60.0, help="seconds of `prune tune` for the tuned row")
    ap.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    args = ap.parse_args()
    eval_tokens = args.eval_tokens or (8192 if args.quick else 32768)
    ratios = [float(r) for r in (args.ratios or ("0.2" if args.quick else "0.2,0.4")).split(",")]
    names = args.configs.split(",") if args.configs else (QUICK if args.quick else list(CONFIGS))
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(machine(), flush=True)
    rows: list[dict[str, Any]] = []
    dense: dict[str, float] = {}
    memos: dict[str, pipeline.Memo] = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        base = Session().with_updates({
            "session.name": "bq", "session.output_dir": tmp, "model.id": "smollm2-135m", "model.device": "cpu",
            "data.num_samples": args.samples, "data.seq_len": 128, "data.batch_size": 4, "data.proxy_samples": 4,
            "evaluation.seq_len": 512, "evaluation.max_tokens": eval_tokens, "evaluation.before": False,
            "evaluation.after": True, "output.save_model": False,
        })

        def measure(session: Session, memo: pipeline.Memo) -> dict[str, Any]:
            out: dict[str, Any] = {}
            t0 = time.perf_counter()
            for d in DOMAINS:
                report = pipeline.run(session.with_updates({"evaluation.dataset": d}), memo=memo, write=False)
                out[d] = report.perplexity["after"]["ppl"]
                out["proxy"] = report.proxy.get("loss", float("nan"))
                out["final"] = report.proxy.get("final", float("nan"))
                out["removed"] = report.achieved_ratio
            out["seconds"] = time.perf_counter() - t0
            return out

        for ratio in ratios:
            for name in names:
                spec = dict(CONFIGS[name])
                is_random, is_tuned = spec.pop("random", False), spec.pop("tune", False)
                session = base.with_updates({**spec, "pruning.ratio": ratio})
                method = session.importance.method
                memo = memos.setdefault(f"{method}-random" if is_random else method, pipeline.Memo())
                if not dense:
                    for d in DOMAINS:
                        r = pipeline.run(session.with_updates({"evaluation.dataset": d, "evaluation.before": True,
                                                               "evaluation.after": False}),
                                         memo=memo, until="eval_before", write=False)
                        dense[d] = r.perplexity["before"]["ppl"]
                if is_random:
                    pipeline.run(session, memo=memo, until="importance", write=False)
                    randomized(memo, seed=0)
                note = ""
                if is_tuned:
                    result = tune(session, budget_s=args.tune, memo=memo, corrections=False)
                    session = result.best
                    note = ", ".join(f"{k}={v}" for k, v in result.best_updates.items()) or "no change"
                r = measure(session, memo)
                row = {"ratio": ratio, "config": name, "note": note, **r}
                rows.append(row)
                print(f"{ratio:.0%} | {name} | {r['shakespeare']:.2f} | {r['wikipedia']:.2f} | proxy "
                      f"{r['proxy']:.4f} | saved model's proxy {r['final']:.4f} | {r['seconds']:.0f} s {note}",
                      flush=True)
                if args.write:  # a long run that is stopped still leaves the rows it measured
                    write_section(rows, dense, args, eval_tokens, started, len(ratios) * len(names), True)

    print(write_section(rows, dense, args, eval_tokens, started, len(ratios) * len(names), args.write))


if __name__ == "__main__":
    from prune_core.importance.allocator import keep_freed_memory

    keep_freed_memory()  # what the `prune` process does at its start
    main()
