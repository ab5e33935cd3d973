"""The commented session template (`prune new`): every key, its default and what it means.

Built from the schema itself, so a new key shows up here without a second list to maintain.
"""

from __future__ import annotations

import typing
from typing import Any

import tomlkit
from tomlkit.items import Table

from sessions.schema import SCHEMA_VERSION, SECTIONS, Session

HEADER = """prune session file (schema version {v}).
Run it headless with `prune run FILE`, open it in the workbench with `prune tui FILE`,
check it with `prune validate FILE`. Every key is optional. The values below are the recommended
configuration (the best measured on held-out text, see BENCHMARKS.md); a key left out takes the
schema default, the plain baseline noted in its comment."""

SECTION_NOTES = {
    "session": "Name, seed and where results go (<output_dir>/<name>/).",
    "model": "The model to prune.",
    "data": "Calibration data for the importance pass.",
    "importance": "How group importance is scored: taylor (1st order), taylor_2nd (+ Fisher), wanda (|W|·‖X‖), "
                  "magnitude (‖W‖, data-free).",
    "correction": "Block/layer correction: importance × (b/mean b)^T × (l/mean l)^tau (0 = off).",
    "normalization": "Normalize importance before the global ranking (seed 004).",
    "pruning": "What to remove and the limits on it.",
    "evaluation": "Perplexity on the held-out split before and after pruning.",
    "diagnosis": "Thresholds of the extreme-pruning diagnosis.",
    "output": "What the results folder holds.",
    "distill": "After surgery, train the pruned model toward the dense model's predictions on the calibration "
               "windows (0 steps = off).",
    "recovery": "LoRA fine-tuning of the pruned model by `prune recover RESULTS` (its command-line options override these).",
}


def _allowed(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    return ""


def template_document(session: Session | None = None) -> tomlkit.TOMLDocument:
    session = session or Session()
    values = session.model_dump(mode="json")
    doc = tomlkit.document()
    for line in HEADER.format(v=SCHEMA_VERSION).splitlines():
        doc.add(tomlkit.comment(line))
    doc.add("schema_version", SCHEMA_VERSION)
    for name, cls in SECTIONS.items():
        doc.add(tomlkit.nl())
        table: Table = tomlkit.table()
        table.comment(SECTION_NOTES.get(name, ""))
        for key, field in cls.model_fields.items():
            item = tomlkit.item(values[name][key])
            default = field.get_default(call_default_factory=True)
            plain = "" if values[name][key] == default else f"schema default {default!r}"
            notes = [n for n in (field.description or "", _allowed(field.annotation), plain) if n]
            if notes:
                item.comment("; ".join(notes))
            table.add(key, item)
        doc.add(name, table)
    return doc


def template_text(session: Session | None = None) -> str:
    """The commented template; without a session, the recommended configuration (sessions/presets.py)."""
    if session is None:
        from sessions.presets import recommended

        session = recommended()
    return tomlkit.dumps(template_document(session))
