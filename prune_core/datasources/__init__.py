"""Text sources behind `prune_core.data`: the Shakespeare corpus, Hub datasets and local files.

Each source turns a dataset name into plain text for two splits, "calibration" and "evaluation".
This package also holds what the sources share: the extracted-text cache under
`<cache>/data/<key>/` (`calibration.txt`, `evaluation.txt`, `manifest.json`, written atomically, the
manifest last), the 90 % / 10 % split of a single text, and event helpers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from prune_core import atomic, paths
from prune_core.events import EventSink, Progress

Split = Literal["calibration", "evaluation"]
SPLITS: tuple[Split, Split] = ("calibration", "evaluation")
STAGE = "data"
DOC_SEPARATOR = "\n\n"  # documents (plays, rows, records) are joined with a blank line
CACHE_FORMAT = 1  # bump when the extraction of any cached source changes

# Single texts are split at 90 %: calibration is the first 90 %, evaluation the last 10 %.
CALIBRATION_FRACTION = 0.9
_SPLIT_SEARCH_FRACTION = 0.05  # look this far (share of the text) past the 90 % mark for a line break


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def emit(on_event: EventSink | None, done: float, total: float | None = None, unit: str = "",
         message: str = "") -> None:
    """Send a `Progress(stage="data")` event if a sink was given."""
    if on_event is not None:
        on_event(Progress(stage=STAGE, done=done, total=total, unit=unit, message=message))


def split_single_text(text: str) -> dict[Split, str]:
    """Split one text into calibration (first ~90 %) and evaluation (last ~10 %).

    The cut is at the first line break at or after 90 % of the characters; if there is none within
    the next 5 % of the text, at the first whitespace there; otherwise at exactly 90 %. The
    separator itself is dropped, so no character is in both splits.
    """
    n = len(text)
    cut = int(n * CALIBRATION_FRACTION)
    window_end = min(n, cut + max(1, int(n * _SPLIT_SEARCH_FRACTION)))
    boundary = text.find("\n", cut, window_end)
    if boundary < 0:
        boundary = next((i for i in range(cut, window_end) if text[i].isspace()), -1)
    if boundary < 0:
        return {"calibration": text[:cut], "evaluation": text[cut:]}
    return {"calibration": text[:boundary].rstrip(), "evaluation": text[boundary + 1:].lstrip()}


# ---------------------------------------------------------------------------------------------
# Extracted-text cache: <cache>/data/<key>/{calibration,evaluation}.txt + manifest.json
# ---------------------------------------------------------------------------------------------

def text_cache_dir(key: str) -> Path:
    return paths.data_dir() / key


def text_cache_present(key: str) -> bool:
    """Cheap check (no hashing) that the extracted text of `key` is cached."""
    folder = text_cache_dir(key)
    return all((folder / name).is_file() for name in ("manifest.json", "calibration.txt", "evaluation.txt"))


def read_text_cache(key: str) -> dict[Split, str] | None:
    """The cached texts of `key`, or None when missing, of an older format, or not matching the manifest."""
    folder = text_cache_dir(key)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != CACHE_FORMAT:
            return None
        texts: dict[Split, str] = {}
        for split in SPLITS:
            text = (folder / f"{split}.txt").read_text(encoding="utf-8")
            if sha256_text(text) != manifest["sha256"][split]:
                return None
            texts[split] = text
        return texts
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_text_cache(key: str, texts: dict[Split, str], info: dict[str, Any]) -> None:
    """Write both splits and then the manifest (so a present manifest means complete files)."""
    folder = text_cache_dir(key)
    for split in SPLITS:
        atomic.write_text(folder / f"{split}.txt", texts[split])
    manifest = {
        "format": CACHE_FORMAT,
        "dataset": key,
        **info,
        "characters": {split: len(texts[split]) for split in SPLITS},
        "sha256": {split: sha256_text(texts[split]) for split in SPLITS},
    }
    atomic.write_json(folder / "manifest.json", manifest)
