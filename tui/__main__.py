"""`python -m tui [SESSION.toml | RESULTS_FOLDER]`: the workbench without the `prune` console script."""

from __future__ import annotations

import sys
from pathlib import Path

from tui import run_tui


def main(argv: list[str] | None = None) -> int:
    from prune_core.importance.allocator import keep_freed_memory

    keep_freed_memory()  # process-wide, so here at the start and not in the engine (allocator.py)
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    return run_tui(Path(args[0]) if args else None)


if __name__ == "__main__":
    raise SystemExit(main())
