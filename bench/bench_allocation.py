"""Benchmark of the allocation step (no model needed: synthetic importances, real group costs).

Measures
- global selection on a 70B-shaped table (Llama-2/3 70B: 80 layers, 8 KV groups of 8 query heads
  × 128 dims, hidden 8192, 28,672 MLP channels per layer ≈ 2.3M groups; goal ≤ 2 s), with and
  without constraints, plus table build / normalization / summary for reference;
- the whole what-if step (correction + normalization + selection + summary + mask hash, i.e.
  `allocate_table`) on a smollm2-135m-shaped table (30 layers, 3 KV groups of 3 heads × 64 dims,
  hidden 576, 1536 MLP channels; goal ≤ 0.3 s).

Each figure is the median of several runs. `--write` appends / replaces the "Allocation" section of
BENCHMARKS.md (other sections are kept; the file is re-read right before writing).

    .venv/bin/python bench/bench_allocation.py [--write] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prune_core import atomic  # noqa: E402
from prune_core.allocation import (  # noqa: E402
    GroupCosts,
    allocate_table,
    build_table,
    layer_summary,
    mask_sha256,
    normalize,
    select,
)
from sessions.schema import Session  # noqa: E402


def shaped_costs(layers: int, kv: int, r: int, d: int, hidden: int, inter: int) -> GroupCosts:
    att = 2 * d * hidden + 2 * r * d * hidden
    return GroupCosts.from_lists([att] * layers, [3 * hidden] * layers, [kv] * layers, [inter] * layers)


def synthetic(costs: GroupCosts, seed: int = 0) -> SimpleNamespace:
    """Log-normal importances with per-layer scales (like real ones: heavy tails, layer trends)."""
    rng = np.random.default_rng(seed)
    layers = costs.num_layers
    scale = np.exp(rng.normal(0, 1, (layers, 1)))
    att = rng.lognormal(0, 1.5, (layers, max(costs.n_attention))) * scale * 50
    mlp = rng.lognormal(0, 1.5, (layers, max(costs.n_mlp))) * scale
    return SimpleNamespace(attention=torch.from_numpy(att), mlp=torch.from_numpy(mlp))


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def run(repeats: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    big = shaped_costs(80, 8, 8, 128, 8192, 28672)
    t_build, table = timed(lambda: build_table(synthetic(big), big), max(1, repeats // 2))
    res["big_rows"] = len(table)
    res["big_table_mb"] = table.memory_usage(deep=True).sum() / 1e6
    res["big_build"] = t_build
    res["big_select"], sel = timed(lambda: select(table, ratio=0.2, prunable_total=big.prunable_total), repeats)
    res["big_select_msg"] = sel.message
    constrained = {"min_rate": 0.05, "max_rate": 0.6, "protect_layers": [0, 1, 79], "early_layers": 8,
                   "early_max_rate": 0.2}
    res["big_select_constrained"], _ = timed(
        lambda: select(table, ratio=0.3, prunable_total=big.prunable_total, **constrained), repeats)
    tied = normalize(table, level="block", method="minmax", clip=[1, 99])  # many exact ties (0 and 1)
    res["big_select_tied"], _ = timed(lambda: select(tied, ratio=0.2, prunable_total=big.prunable_total), repeats)
    res["big_normalize"], _ = timed(lambda: normalize(table, level="block", method="zscore", clip=[1, 99]), repeats)
    marked = table.assign(pruned=sel.pruned)
    res["big_summary"], _ = timed(lambda: (layer_summary(marked, 80), mask_sha256(marked)), repeats)

    small = shaped_costs(30, 3, 3, 64, 576, 1536)
    small_table = build_table(synthetic(small, 1), small)
    res["small_rows"] = len(small_table)
    block = SimpleNamespace(attention=list(np.linspace(0.5, 2, 30)), mlp=list(np.linspace(2, 0.5, 30)),
                            layer=list(np.linspace(1, 3, 30)))
    cases = {
        "log/layer": {"normalization": {"level": "layer", "method": "log"}},
        "zscore/block + clip + correction + constraints": {
            "normalization": {"level": "block", "method": "zscore", "clip": [1, 99]},
            "correction": {"temperature": 1.0, "tau": 0.5},
            "pruning": {"ratio": 0.3, "min_rate": 0.05, "max_rate": 0.7, "protect_layers": [0, 29],
                        "early_layers": 3, "early_max_rate": 0.3, "depth_weight": 0.5},
        },
    }
    res["small"] = {}
    for name, data in cases.items():
        sess = Session.model_validate(data)
        res["small"][name], _ = timed(lambda s=sess: allocate_table(small_table, small, s, block), repeats * 4)
    return res


def report(res: dict[str, Any]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "## Allocation",
        "",
        f"Synthetic log-normal importances, real group costs; median of repeated runs on this machine "
        f"({cpu}, {torch.get_num_threads()} torch threads, numpy {np.__version__}). "
        "Reproduce: `.venv/bin/python bench/bench_allocation.py --write`.",
        "",
        f"70B-shaped table: {res['big_rows']:,} groups (80 layers × (8 KV groups + 28,672 MLP channels)), "
        f"{res['big_table_mb']:.0f} MB.",
        "",
        "| step | seconds | goal |",
        "|---|---:|---:|",
        f"| select, ratio 0.2 | {res['big_select']:.3f} | ≤ 2 |",
        f"| select, ratio 0.3 with min/max rate, protected and early layers | {res['big_select_constrained']:.3f} | ≤ 2 |",
        f"| select after block minmax (many exact ties) | {res['big_select_tied']:.3f} | ≤ 2 |",
        f"| build table | {res['big_build']:.3f} | |",
        f"| normalize (block, zscore, clip 1–99) | {res['big_normalize']:.3f} | |",
        f"| per-layer summary + mask hash | {res['big_summary']:.3f} | |",
        "",
        f"What-if step on a smollm2-135m-shaped table ({res['small_rows']:,} groups): correction + "
        "normalization + selection + summary + mask hash (`allocate_table`).",
        "",
        "| settings | seconds | goal |",
        "|---|---:|---:|",
    ]
    for name, secs in res["small"].items():
        lines.append(f"| {name} | {secs:.4f} | ≤ 0.3 |")
    lines.append("")
    return "\n".join(lines)


PLACEHOLDER = ("## Perplexity at 20 %\n\n"
               "_To be filled by the lead with the full pipeline (one row per importance method)._\n")


def write_section(section: str, path: Path) -> None:
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"  # re-read right before writing
    pattern = re.compile(r"^## Allocation\n.*?(?=^## |\Z)", re.S | re.M)
    body = section.rstrip() + "\n\n"
    text = pattern.sub(lambda _m: body, text, count=1) if pattern.search(text) else text.rstrip() + "\n\n" + body
    if "## Perplexity at 20 %" not in text:
        text = text.rstrip() + "\n\n" + PLACEHOLDER
    atomic.write_text(path, text.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help="update the Allocation section of BENCHMARKS.md")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    section = report(run(args.repeats))
    print(section)
    if args.write:
        write_section(section, ROOT / "BENCHMARKS.md")
        print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
