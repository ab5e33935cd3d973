"""The glibc malloc tuning is the `prune` process's choice, never a side effect of the engine (issue 16).

Each check runs in a fresh interpreter whose `ctypes.CDLL` records every lookup of `mallopt`, so a
call from anywhere (the engine, the pipeline, a library) is seen, not only one through allocator.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

SPY = """
import ctypes, json, sys
sys.path.insert(0, {root!r})
calls = []

class SpyCDLL(ctypes.CDLL):
    def __getattr__(self, name):
        if name == "mallopt":
            calls.append(name)
        return super().__getattr__(name)

ctypes.CDLL = SpyCDLL

def report():
    from prune_core.importance import allocator
    print("SPY " + json.dumps({{"mallopt": len(calls), "state": allocator._state}}))
"""

ENGINE = """
import torch
from prune_core.adapters import get_adapter
from prune_core.importance import run_importance
from prune_core.tiny import build_tiny
model = build_tiny("tiny-llama")[0]
tokens = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
for method in ("taylor", "wanda"):
    run_importance(model, get_adapter(model), tokens, method=method, batch_size=2)
report()
"""

CLI = """
sys.argv = ["prune", "--version"]
from cli.main import main
try:
    main()
except SystemExit:
    pass
report()
"""

TUI = """
import contextlib, io
from tui.__main__ import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["--help"])
report()
"""


def spied(body: str, **env: str) -> dict:
    """Run `body` in a fresh interpreter behind the mallopt spy; what the spy saw."""
    script = SPY.format(root=str(ROOT)) + body
    environ = {k: v for k, v in os.environ.items() if k != "PRUNE_MALLOC_TUNING"} | env
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=environ,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("SPY ")]
    return json.loads(line.removeprefix("SPY "))


def test_the_engine_leaves_malloc_alone() -> None:
    seen = spied(ENGINE)
    assert seen == {"mallopt": 0, "state": {}}


@pytest.mark.parametrize("body", [CLI, TUI], ids=["prune", "python -m tui"])
def test_the_prune_process_tunes_malloc_at_its_start(body: str) -> None:
    seen = spied(body)
    assert seen["state"] == {"applied": GLIBC}
    assert (seen["mallopt"] > 0) == GLIBC


@pytest.mark.parametrize("body", [CLI, TUI], ids=["prune", "python -m tui"])
def test_prune_malloc_tuning_0_opts_out(body: str) -> None:
    assert spied(body, PRUNE_MALLOC_TUNING="0") == {"mallopt": 0, "state": {"applied": False}}
