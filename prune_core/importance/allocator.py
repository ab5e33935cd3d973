"""Keep freed memory inside the process (glibc), so each batch reuses the last batch's gradient memory.

With glibc malloc's default, dynamic thresholds, the importance pass (which keeps its sums alive
between batches) makes glibc hand the freed gradient memory of every batch back to the OS and fault
it in again on the next one: on smollm2-135m ~100k minor page faults per batch, 4–5 % of the pass
time, which the same forward+backward loop without the pass does not pay. Raising M_MMAP_THRESHOLD
and M_TRIM_THRESHOLD (the knobs behind MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_) keeps that
memory in the heap for reuse; the price is that the process keeps up to about its peak RSS after a
pass (blocks of 1 GiB and more are still mapped and returned on their own).

This changes the whole process, so no library call makes it: the `prune` command (`cli.main.main`,
which also opens the workbench) and `python -m tui` call `keep_freed_memory()` once at their start;
`run_importance` and the pipeline leave the allocator alone (a notebook or another program that
imports them keeps its own settings, and may call `keep_freed_memory()` itself to get the speed).
Only on Linux with glibc; set PRUNE_MALLOC_TUNING=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD = 1 << 30  # 1 GiB: every gradient buffer of a 70B layer comes from the heap

_state: dict[str, bool] = {}


def keep_freed_memory() -> bool:
    """Raise glibc's trim/mmap thresholds (once per process); True if they are raised."""
    if "applied" in _state:
        return _state["applied"]
    applied = False
    if os.environ.get("PRUNE_MALLOC_TUNING", "1") != "0" and platform.system() == "Linux":
        libc_name = platform.libc_ver()[0]
        if libc_name == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                ok_trim = libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(THRESHOLD))
                ok_mmap = libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(THRESHOLD))
                applied = bool(ok_trim and ok_mmap)
            except (OSError, AttributeError):
                applied = False
    _state["applied"] = applied
    return applied
