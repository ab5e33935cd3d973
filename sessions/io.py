"""Read and write session files: tomllib to read, tomlkit to rewrite keeping the user's comments.

Writes are atomic (temporary file + rename), and `load(save(s)) == s` for every valid session.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import tomlkit

from prune_core.atomic import write_text
from prune_core.errors import BadInput
from sessions.errors import SessionError
from sessions.schema import Session, validate_dict
from sessions.template import template_document

MAX_SESSION_BYTES = 1 << 20  # a session file is a few kB; anything near this is not one


def parse_text(text: str, source: str = "session") -> Session:
    try:
        data = tomllib.loads(text.removeprefix("\ufeff"))  # a byte-order mark is not part of the TOML
    except tomllib.TOMLDecodeError as exc:
        raise SessionError([("(toml)", f"invalid TOML: {exc}")], source=source) from None
    except RecursionError:
        raise SessionError([("(toml)", "invalid TOML: values nested too deeply")], source=source) from None
    try:
        return validate_dict(data, source=source)
    except RecursionError:
        raise SessionError([("(toml)", "values nested too deeply")], source=source) from None


def load(path: str | os.PathLike[str]) -> Session:
    """Load and validate a session file, reporting every problem at once (BadInput)."""
    p = Path(path)
    if not p.exists():
        raise BadInput(f"session file {str(p)!r} does not exist", "check the path, or create one with `prune new`")
    if p.is_dir():
        raise BadInput(f"{str(p)!r} is a folder, not a session file",
                       "pass a .toml file (a results folder holds one as session.toml)")
    if not p.is_file():
        raise BadInput(f"{str(p)!r} is not a regular file (a device, pipe or socket)", "pass a session .toml file")
    try:
        if p.stat().st_size > MAX_SESSION_BYTES:
            raise BadInput(f"{str(p)!r} is {p.stat().st_size:,} bytes, too large for a session file",
                           "pass a session .toml file (a few kB)")
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read session file {str(p)!r}: {exc}", "check the file's permissions and encoding") from None
    return parse_text(text, source=str(p))


def _merge(doc: Any, values: dict[str, Any]) -> None:
    """Set values into a tomlkit container in place, leaving comments and order alone."""
    for key, value in values.items():
        if isinstance(value, dict):
            if key not in doc or not isinstance(doc[key], dict):
                doc[key] = tomlkit.table()
            _merge(doc[key], value)
        elif key not in doc or doc[key] != value:
            doc[key] = value
    for key in [k for k in doc if k not in values]:
        del doc[key]


def dumps(session: Session, existing_text: str | None = None,
          extra_tables: dict[str, dict[str, Any]] | None = None) -> str:
    """Render a session as TOML; with `existing_text`, rewrite that document keeping its comments.

    `extra_tables` (e.g. `[provenance]` in a results folder) replace any tables of those names and
    are appended after the schema tables.
    """
    values = session.model_dump(mode="json")
    doc = None
    if existing_text is not None:
        try:
            doc = tomlkit.parse(existing_text)
        except Exception:
            doc = None
    if doc is None:
        doc = template_document(session)
    for name in extra_tables or {}:
        doc.pop(name, None)
    _merge(doc, values)
    for name, table in (extra_tables or {}).items():
        doc.add(tomlkit.nl())
        doc[name] = {k: ("" if v is None else v) for k, v in table.items()}
    return tomlkit.dumps(doc)


def save(session: Session, path: str | os.PathLike[str], extra_tables: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write a session atomically; if the file exists its comments and layout are kept.

    `extra_tables` (e.g. `[provenance]` in a results folder) are appended after the schema tables.
    """
    p = Path(path)
    existing = p.read_text(encoding="utf-8-sig") if p.is_file() else None  # a BOM is not TOML: dropped
    write_text(p, dumps(session, existing, extra_tables))
    return p


def load_with_extras(path: str | os.PathLike[str]) -> tuple[Session, dict[str, Any]]:
    """Load a results-folder session.toml: the session plus its extra tables (e.g. provenance)."""
    from sessions.schema import Session as _S

    p = Path(path)
    if not p.is_file() or p.stat().st_size > MAX_SESSION_BYTES:
        raise BadInput(f"{str(p)!r} is not a session file (missing, not a regular file, or too large)",
                       "re-run the session to rewrite its results")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SessionError([("(toml)", f"invalid TOML: {exc}")], source=str(p)) from None
    extras = {k: data.pop(k) for k in list(data) if k not in _S.model_fields}
    return validate_dict(data, source=str(p)), extras
