"""Validation of session data: every problem at once, each with its key path and the allowed values."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from prune_core.errors import BadInput

M = TypeVar("M", bound=BaseModel)


class SessionError(BadInput):
    """A session file (or update) has problems; `problems` lists (key path, message) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "session") -> None:
        self.problems = problems
        self.source = source
        n = len(problems)
        lines = "\n".join(f"  {path}: {msg}" for path, msg in problems)
        super().__init__(
            f"{source}: {n} problem{'s' if n != 1 else ''}\n{lines}",
            "edit the keys above (`prune new` writes a commented template with every key)",
        )

    def __str__(self) -> str:
        return f"{self.message}\nFix: {self.fix}"


def _allowed_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    if len(loc) == 1:
        return [k for k in root.model_fields]
    field = root.model_fields.get(str(loc[0]))
    section = field.annotation if field is not None else None
    return list(section.model_fields) if isinstance(section, type) and issubclass(section, BaseModel) else []


def _default(root: type[BaseModel], section: str, key: str) -> Any:
    cls = root.model_fields[section].annotation
    assert isinstance(cls, type) and issubclass(cls, BaseModel)
    return cls.model_fields[key].default


def _describe(root: type[BaseModel], err: Any) -> tuple[str, str]:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(top level)"
    typ = err["type"]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if typ == "extra_forbidden":
        allowed = _allowed_keys(root, loc)
        msg = f"unknown key (allowed: {', '.join(allowed)})" if allowed else "unknown key"
    elif typ == "literal_error" or typ in {"greater_than", "less_than", "greater_than_equal", "less_than_equal",
                 "int_type", "float_type", "bool_type", "string_type", "list_type", "int_parsing",
                 "float_parsing", "bool_parsing", "string_pattern_mismatch", "string_too_short",
                 "finite_number", "int_from_float", "model_type", "dict_type"}:
        got = repr(err.get("input"))
        msg = f"{msg} (got {got if len(got) <= 80 else got[:77] + '...'})"
    if typ == "model_type" and len(loc) == 1:
        msg = f"[{loc[0]}] must be a table, got {err.get('input')!r}"
    return path, msg


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _cross_problems(root: type[BaseModel], data: dict[str, Any]) -> list[tuple[str, str]]:
    """Checks across keys, done on the raw values so they are reported even when a neighbour key is bad."""
    problems = []
    pruning = data.get("pruning") if isinstance(data.get("pruning"), dict) else {}
    lo = _number(pruning.get("min_rate", _default(root, "pruning", "min_rate")))
    hi = _number(pruning.get("max_rate", _default(root, "pruning", "max_rate")))
    if lo is not None and hi is not None and lo > hi:
        problems.append(("pruning.min_rate", f"min_rate ({lo}) must not exceed max_rate ({hi})"))
    section = data.get("data") if isinstance(data.get("data"), dict) else {}
    bs = _number(section.get("batch_size", _default(root, "data", "batch_size")))
    ns = _number(section.get("num_samples", _default(root, "data", "num_samples")))
    if bs is not None and ns is not None and bs > ns:
        problems.append(("data.batch_size", f"batch_size ({int(bs)}) must not exceed num_samples ({int(ns)})"))
    return problems


def validate_with(root: type[M], data: dict[str, Any], source: str = "session") -> M:
    """Validate a plain dict into `root` (the Session model), raising SessionError with every problem."""
    try:
        return root.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(root, e) for e in exc.errors()]
        # cross-field errors have an empty location; name the keys they concern
        fixed = []
        for path, msg in problems:
            if path == "data" and "batch_size" in msg:
                path = "data.batch_size"
            elif path == "pruning" and "min_rate" in msg:
                path = "pruning.min_rate"
            fixed.append((path, msg))
        for problem in _cross_problems(root, data):
            if problem not in fixed:
                fixed.append(problem)
        raise SessionError(fixed, source=source) from None
