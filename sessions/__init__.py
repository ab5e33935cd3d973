"""Session files: the schema (pydantic), validation with every problem reported, and TOML I/O."""

from sessions.errors import SessionError
from sessions.io import dumps, load, load_with_extras, parse_text, save
from sessions.schema import SCHEMA_VERSION, Session, check_against_model, choices, validate_dict
from sessions.template import template_text

__all__ = [
    "SCHEMA_VERSION",
    "Session",
    "SessionError",
    "check_against_model",
    "choices",
    "dumps",
    "load",
    "load_with_extras",
    "parse_text",
    "save",
    "template_text",
    "validate_dict",
]
