"""Child process for tests/test_plan.py: one importance pass, its peak memory (RSS) printed as JSON.

Run as `python tests/plan_measure.py MODEL METHOD BATCH SEQ BATCHES [--checkpointing]`. After a warm-up pass on 8 tokens (imports, kernel set-up), the model is
loaded with prune_core.models.resolve_model (float32, CPU); a thread samples the RSS every 0.5 ms
from just before the pass to its end, and the kernel's high-water mark (ru_maxrss) is read too.
The parent sets MALLOC_MMAP_THRESHOLD_ so glibc returns every large block to the OS when it is
freed: the RSS then follows the tensors alive (glibc's default raises the threshold after frees,
so freed blocks would stay in the heap and the RSS would show the allocator, not the pass).
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time

import psutil
import torch


def main() -> None:
    model_id, method, batch, seq, batches = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    checkpointing = "--checkpointing" in sys.argv
    torch.set_num_threads(1)
    from prune_core.adapters import adapter_for_type
    from prune_core.importance.engine import run_importance
    from prune_core.models import resolve_model

    loaded = resolve_model(model_id, device="cpu", dtype="float32")
    vocab = int(loaded.model.config.vocab_size)
    tokens = torch.randint(0, min(vocab, 250), (batch * batches, seq), generator=torch.Generator().manual_seed(0))
    adapter = adapter_for_type(loaded.family)
    # warm-up: the first pass imports modules and initialises kernels (a fixed cost, not the pass's)
    run_importance(loaded.model, adapter, tokens[:1, :8], method=method, batch_size=1,
                   gradient_checkpointing=checkpointing, checkpoint_seconds=0.0)
    proc = psutil.Process()
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    before_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = proc.memory_info().rss
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run_importance(loaded.model, adapter, tokens, method=method, batch_size=batch,
                   gradient_checkpointing=checkpointing, checkpoint_seconds=0.0)
    done.set()
    thread.join()
    after_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # the high-water mark counts only when the pass raised it (loading may have gone higher before)
    high = after_max if after_max > before_max else 0
    print(json.dumps({"base": base, "sampled_peak": peak[0], "ru_maxrss": high,
                      "pass_peak": max(peak[0], high) - base}))


if __name__ == "__main__":
    main()
