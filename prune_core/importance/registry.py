"""The importance-method registry: the one place the methods are listed.

    from prune_core.importance.registry import METHODS, get_method, method_keys
    method_keys()              # ("taylor", "taylor_2nd", "wanda", "magnitude")
    spec = get_method("wanda")  # MethodSpec: label, description, needs_*, stats_label, hooks

Importing this module does not import torch (the method modules are light; their scoring hooks
import the engine helpers on first call), so `sessions.schema`, the TUI and the estimate read it
freely. The schema's `importance.method` choices, the TUI's method list, the time/memory estimate,
the engine and the diagnosis all read it. Adding a method = one module in methods/ exposing `SPEC`
plus its name in `_MODULES` below.
"""

from __future__ import annotations

from importlib import import_module

from prune_core.errors import BadInput
from prune_core.importance.methods.spec import MethodScores, MethodSpec, ScoreInputs

# module names under prune_core.importance.methods, in the order the UI lists them (the first is the default)
_MODULES: tuple[str, ...] = ("taylor", "taylor_2nd", "wanda", "magnitude")


def _load() -> dict[str, MethodSpec]:
    specs: dict[str, MethodSpec] = {}
    for name in _MODULES:
        spec = import_module(f"prune_core.importance.methods.{name}").SPEC
        if not isinstance(spec, MethodSpec) or spec.key in specs:
            raise RuntimeError(f"prune_core.importance.methods.{name}.SPEC is not a new MethodSpec")
        specs[spec.key] = spec
    return specs


METHODS: dict[str, MethodSpec] = _load()
DEFAULT_METHOD: str = next(iter(METHODS))
# How thinly a gradient pass takes its live statistics (the scores always use every element of every
# batch): every STATS_EVERY-th batch, reading STATS_SAMPLE of each weight gradient's rows (accumulate.py:
# a block that moves on with each statistics batch). 1 and 1 read everything. Chosen by measurement
# (BENCHMARKS.md, "Importance pass"): on 2 CPU cores full statistics cost ~15 % of a pass.
STATS_EVERY: int = 4
STATS_SAMPLE: float = 0.0625


def method_keys() -> tuple[str, ...]:
    """The registered method keys, in display order."""
    return tuple(METHODS)


def get_method(key: str) -> MethodSpec:
    """The spec of `key`; BadInput listing the valid keys when it is not registered."""
    spec = METHODS.get(key)
    if spec is None:
        raise BadInput(f"unknown importance method {key!r}", f"use one of {', '.join(METHODS)}")
    return spec


def stats_noun(label: str) -> str:
    """How reports name the statistics of `label` ("gradient", "activation norm", "weight")."""
    return next((m.stats_noun for m in METHODS.values() if m.stats_label == label), label or "gradient")


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "MethodScores",
    "MethodSpec",
    "ScoreInputs",
    "get_method",
    "method_keys",
    "stats_noun",
]
