"""Apply a diagnosis fix (dotted session keys → values) to a session file, keeping its comments.

`apply_fix()` edits the TOML document with tomlkit (comments, order and layout stay), validates the
result with the session schema, and writes it atomically to a new path. A results folder (or its
`session.toml`) works as the source: its `[provenance]` table is dropped, since the new file is the
input of a new run, not a record of an old one. Trust is never inherited: a fix may only set keys
of FIXABLE_SECTIONS (never `model.*`, so never `trust_remote_code`), and the written session always
has `model.trust_remote_code = false`, whatever the source file says; a user who trusts the model
turns it on in the written file by hand.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomlkit

from prune_core.atomic import write_text
from prune_core.errors import BadInput
from sessions import SessionError, parse_text
from sessions.schema import SECTIONS, Session

RECORD_TABLES = ("provenance",)


def _source_file(session_path: Path) -> Path:
    p = Path(session_path)
    if p.is_dir():
        p = p / "session.toml"
    if not p.is_file():
        raise BadInput(f"session file {str(p)!r} does not exist",
                       "pass a session .toml file or a results folder that holds session.toml")
    return p


# A fix comes from a results folder, which may be someone else's: it may change how the model is pruned,
# never which model is loaded, where results go, or whether code shipped with a model runs.
FIXABLE_SECTIONS = ("data", "importance", "correction", "normalization", "pruning", "evaluation", "diagnosis")
FORBIDDEN_KEYS = ("data.dataset", "evaluation.dataset")


def check_fix(fix: dict[str, Any]) -> None:
    """Raise SessionError listing every key of `fix` that is not `section.key` of the schema, or that a
    fix may not change (model, session, output, data sources)."""
    problems = []
    for dotted in fix:
        section, _, key = str(dotted).partition(".")
        cls = SECTIONS.get(section)
        if cls is None or not key or key not in cls.model_fields:
            problems.append((str(dotted), "unknown key (a fix names keys as section.key, e.g. pruning.max_rate)"))
        elif section not in FIXABLE_SECTIONS or dotted in FORBIDDEN_KEYS:
            problems.append((str(dotted), "a fix may not change this key (only how the model is pruned); "
                                          "edit the session file by hand if you mean it"))
    if problems:
        raise SessionError(problems, source="fix")


def fix_changes(session: Session, fix: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, current value, new value) for every key of `fix`, to show before applying it."""
    check_fix(fix)
    data = session.model_dump(mode="json")
    out = []
    for dotted, value in fix.items():
        section, _, key = dotted.partition(".")
        out.append((dotted, data[section][key], value))
    return out


def apply_fix(session_path: Path, fix: dict[str, Any], out_path: Path, *, name: str | None = None) -> Session:
    """Write `out_path`: the session at `session_path` with `fix` applied (and `session.name` = `name`).

    Comments and layout of the source are kept; the result is validated before anything is written
    (SessionError lists every problem). `session_path` may be a results folder. Returns the new Session.
    """
    src = _source_file(session_path)
    check_fix(fix)
    text = src.read_text(encoding="utf-8-sig")  # without a byte-order mark (tomlkit refuses one)
    try:
        doc = tomlkit.parse(text)
        tomllib.loads(text)
    except Exception as exc:
        raise SessionError([("(toml)", f"invalid TOML: {exc}")], source=str(src)) from None
    for table in RECORD_TABLES:
        if table in doc:
            del doc[table]
    updates = dict(fix)
    if name is not None:
        updates["session.name"] = name
    # the source may be someone else's results folder: the new session never trusts the model's code
    # (edit the written file by hand to turn it on for a model you trust)
    updates["model.trust_remote_code"] = False
    for dotted, value in updates.items():
        section, _, key = dotted.partition(".")
        if section not in doc:
            doc.add(tomlkit.nl())
            doc.add(section, tomlkit.table())
        doc[section][key] = value  # type: ignore[index]
    new_text = tomlkit.dumps(doc)
    session = parse_text(new_text, source=f"{out_path} (fix applied to {src})")
    write_text(Path(out_path), new_text)
    return session
