"""The data-parallel row of bench/bench_importance.py: a taylor pass split over 2 gloo processes on the CPU
against one process with the same total threads.

One process: `torch.get_num_threads()` threads (the machine's usable cores), the pass over all batches.
Two processes (torch.multiprocessing.spawn, the torch.distributed environment a launcher sets, gloo,
`prune_core.distributed.setup`): half the threads each; rank r reads batches r, r + 2, … and the sums are
all-reduced at the end, so the result equals the single process's (tests/test_distributed.py checks that).
Each side loads the model once, warms up with one pass, then times `rounds` passes (wall time of rank 0,
between barriers, so the all-reduce and the slower rank are included). Reported: seconds per pass of each
and their ratio, two processes over one (below 1: data parallelism pays on this machine).
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

WORLD = 2


def _load(model_id: str, samples: int, seq_len: int) -> tuple[Any, Any, torch.Tensor]:
    from prune_core.adapters import get_adapter
    from prune_core.data import calibration_tokens
    from prune_core.models import resolve_model

    loaded = resolve_model(model_id, dtype="float32", device="cpu")
    tokens = calibration_tokens(loaded.tokenizer, "shakespeare", samples, seq_len, seed=0)
    return loaded.model, get_adapter(loaded.model), tokens


def _passes(model: Any, adapter: Any, tokens: torch.Tensor, batch_size: int, rounds: int,
            sync: Any = None) -> list[float]:
    from prune_core.importance import run_importance

    times: list[float] = []
    for r in range(rounds + 1):  # round 0 warms up
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        run_importance(model, adapter, tokens, method="taylor", batch_size=batch_size)
        if sync is not None:
            sync()
        if r:
            times.append(time.perf_counter() - t0)
    return times


def _rank(rank: int, port: int, threads: int, model_id: str, samples: int, seq_len: int, batch_size: int,
          rounds: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)})
    torch.set_num_threads(threads)
    from prune_core import distributed
    from prune_core.importance.allocator import keep_freed_memory

    keep_freed_memory()  # as the `prune` process does at its start
    distributed.setup("cpu")
    try:
        model, adapter, tokens = _load(model_id, samples, seq_len)
        times = _passes(model, adapter, tokens, batch_size, rounds, sync=torch.distributed.barrier)
        if rank == 0:
            Path(out).write_text(" ".join(f"{t:.6f}" for t in times), encoding="utf-8")
    finally:
        torch.distributed.barrier()
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(model_id: str, samples: int, seq_len: int, batch_size: int, rounds: int) -> dict[str, Any]:
    """Seconds per taylor pass in one process and in two, same total threads; see the module docstring."""
    threads = torch.get_num_threads()
    model, adapter, tokens = _load(model_id, samples, seq_len)
    one = _passes(model, adapter, tokens, batch_size, rounds)
    del model, adapter
    per_rank = max(1, threads // WORLD)
    with tempfile.TemporaryDirectory(prefix="bench-dp-") as tmp:
        out = Path(tmp) / "times"
        mp.spawn(_rank, args=(_free_port(), per_rank, model_id, samples, seq_len, batch_size, rounds, str(out)),
                 nprocs=WORLD, join=True)
        two = [float(x) for x in out.read_text(encoding="utf-8").split()]
    return {"threads": threads, "threads_per_rank": per_rank, "one_process_s": one, "two_processes_s": two,
            "ratio": statistics.median(two) / statistics.median(one)}
