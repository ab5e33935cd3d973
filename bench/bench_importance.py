"""Benchmark of the importance pass on smollm2-135m: overhead ratios and the Fisher memory cost.

    python bench/bench_importance.py [--samples 8] [--seq-len 128] [--batch-size 2] [--rounds 5]

Measured in one run (figures go to BENCHMARKS.md, section "Importance pass"):
- taylor / bare loop: the bare loop runs the same forward+backward passes (same batches, same
  requires_grad set-up: only the scored parameters, use_cache=False, grads set to None, loss.item())
  and nothing else;                                                            goal ≤ 1.05
- taylor_2nd / taylor;                                                          goal ≤ 1.10
- wanda / taylor;                                                               goal ≤ 0.45
- peak memory of taylor_2nd minus taylor, against the float32 size of the scored parameters
  (goal ≤ 1.1×). Method: each pass runs in a fresh child process (same model, same tokens); a
  thread samples the process RSS (psutil) every 1 ms from just before the pass to its end, and the
  peak minus the RSS before the pass is that pass's memory; ru_maxrss is printed as a cross-check.
Timings run in a child process, interleaved (bare, taylor, taylor_2nd, wanda, order rotated every
round) because the CPU is shared; each ratio is the median over rounds of the per-round ratio (the
ratio of the fastest runs is printed too). The timing child runs twice: as shipped (run_importance
raises glibc's malloc trim/mmap thresholds on CPU, see prune_core/importance/allocator.py), and with
PRUNE_MALLOC_TUNING=0 (glibc defaults: the sums the pass keeps alive make glibc return and re-fault
hundreds of MB of gradient memory per batch, ~100k minor page faults that the bare loop does not pay).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402

from prune_core.adapters import get_adapter  # noqa: E402
from prune_core.importance import run_importance  # noqa: E402
from prune_core.importance.engine import batch_slices  # noqa: E402
from prune_core.importance.groups import prunable_targets  # noqa: E402
from prune_core.importance.prepare import prepared  # noqa: E402

METHODS = ("taylor", "taylor_2nd", "wanda")
VARIANTS = (("as shipped", None), ("PRUNE_MALLOC_TUNING=0", {"PRUNE_MALLOC_TUNING": "0"}))


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor, dict[str, str]]:
    """The model and calibration tokens; says where they came from."""
    from prune_core.models import resolve_model

    loaded = resolve_model(args.model, dtype="float32", device="cpu")
    info = {"model": f"{args.model} ({loaded.source})"}
    try:
        from prune_core.data import calibration_tokens

        tokens = calibration_tokens(loaded.tokenizer, "shakespeare", args.samples, args.seq_len, seed=0)
        info["data"] = "shakespeare calibration windows (seed 0)"
    except Exception as exc:  # data sources not available: random tokens still time the same work
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, loaded.model.config.vocab_size, (args.samples, args.seq_len), generator=gen)
        info["data"] = f"random tokens ({type(exc).__name__}: {exc})"
    return loaded.model, tokens, info


def bare_loop(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """The same forward+backward passes as the taylor pass, with nothing else; returns seconds."""
    adapter = get_adapter(model)
    params = [t.param for t in prunable_targets(adapter.all_parts(model))]
    with prepared(model, grad_params=params, layers=list(adapter.layers(model))):
        start = time.perf_counter()
        for lo, hi in batch_slices(int(tokens.shape[0]), batch_size):
            for p in params:
                p.grad = None
            ids = tokens[lo:hi]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            float(loss.detach())
        seconds = time.perf_counter() - start
        for p in params:
            p.grad = None
    return seconds


def timed_pass(model: torch.nn.Module, tokens: torch.Tensor, method: str, batch_size: int) -> float:
    start = time.perf_counter()
    run_importance(model, get_adapter(model), tokens, method=method, batch_size=batch_size)
    return time.perf_counter() - start


def timing_child(args: argparse.Namespace) -> None:
    """Runs in a child process: interleaved timings of the bare loop and the three passes."""
    model, tokens, info = load(args)
    runners = {
        "bare": lambda: bare_loop(model, tokens, args.batch_size),
        **{m: (lambda m=m: timed_pass(model, tokens, m, args.batch_size)) for m in METHODS},
    }
    for run in runners.values():  # warm-up (allocator, thread pools)
        run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for r in range(args.rounds):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(runners[name]())
        line = ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items())
        print(f"  round {r + 1}/{args.rounds}: {line}", file=sys.stderr, flush=True)
    print(json.dumps({"times": times, "info": info, "threads": torch.get_num_threads()}))


class RssSampler:
    """Peak RSS of this process over a window, sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one pass of args.memory_child, prints JSON with its memory."""
    import gc

    model, tokens, _ = load(args)
    gc.collect()
    with RssSampler() as rss:
        run_importance(
            model, get_adapter(model), tokens, method=args.memory_child, batch_size=args.batch_size
        )
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {
        "rss_before": rss.base,
        "rss_peak": rss.peak,
        "pass_peak": rss.peak - rss.base,
        "ru_maxrss": maxrss,
    }
    print(json.dumps({"method": args.memory_child, **out}))


def child(args: argparse.Namespace, flag: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        *flag,
        "--model",
        args.model,
        "--samples",
        str(args.samples),
        "--seq-len",
        str(args.seq_len),
        "--batch-size",
        str(args.batch_size),
        "--rounds",
        str(args.rounds),
    ]
    res = subprocess.run(
        cmd, stdout=subprocess.PIPE, text=True, check=True, cwd=ROOT, env={**os.environ, **(env or {})}
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def ratios(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    def ratio(a: str, b: str) -> dict[str, float]:
        per_round = [x / y for x, y in zip(times[a], times[b], strict=True)]
        return {"median": statistics.median(per_round), "of_min": min(times[a]) / min(times[b])}

    return {
        "taylor/bare": ratio("taylor", "bare"),
        "taylor_2nd/taylor": ratio("taylor_2nd", "taylor"),
        "wanda/taylor": ratio("wanda", "taylor"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--memory-child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    if args.timing_child:
        timing_child(args)
        return

    timings = {}
    for name, env in VARIANTS:
        print(f"timing ({name}) ...", file=sys.stderr, flush=True)
        timings[name] = child(args, ["--timing-child"], env)
    memory = {m: child(args, ["--memory-child", m]) for m in ("taylor", "taylor_2nd")}
    fisher_delta = memory["taylor_2nd"]["pass_peak"] - memory["taylor"]["pass_peak"]

    model, _, _ = load(args)
    scored = sum(t.param.numel() for t in prunable_targets(get_adapter(model).all_parts(model)))
    fp32_scored = scored * 4
    first = next(iter(timings.values()))
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs (shared), torch {torch.__version__}, "
        f"{first['threads']} threads",
        **first["info"],
        "samples": args.samples,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "scored_parameters": scored,
        "timing": {
            name: {
                "seconds": {
                    k: {"median": statistics.median(v), "min": min(v)} for k, v in t["times"].items()
                },
                "ratios": ratios(t["times"]),
                "raw": t["times"],
            }
            for name, t in timings.items()
        },
        "memory": memory,
        "taylor_2nd_minus_taylor_bytes": fisher_delta,
        "fp32_scored_bytes": fp32_scored,
        "memory_ratio": fisher_delta / fp32_scored,
    }
    print(json.dumps(figures, indent=2))
    print()
    goals = {"taylor/bare": 1.05, "taylor_2nd/taylor": 1.10, "wanda/taylor": 0.45}
    for name, t in figures["timing"].items():
        print(f"[{name}]")
        for key, goal in goals.items():
            r = t["ratios"][key]
            print(f"  {key:<19} {r['median']:.3f} (min-based {r['of_min']:.3f})  goal <= {goal}")
    print(
        f"taylor_2nd - taylor peak memory {fisher_delta / 2**20:.0f} MiB = {fisher_delta / fp32_scored:.2f} x "
        f"fp32 scored weights ({fp32_scored / 2**20:.0f} MiB)  goal <= 1.10"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
