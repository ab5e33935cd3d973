"""Render a comparison of two runs (from `prune_core.compare`) for the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from prune_core.compare import format_comparison


def print_comparison(console: Console, cmp: dict[str, Any]) -> None:
    console.print(format_comparison(cmp), markup=False, highlight=False)
