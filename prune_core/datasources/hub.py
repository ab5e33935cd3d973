"""Hugging Face Hub datasets (`wikitext2`, `c4`, `ptb`) through the `datasets` library.

The text of both splits is extracted once and cached under `<cache>/data/<key>/`; later runs read
only that cache and never touch `datasets` or the network. The first load never hangs offline:

1. `HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set → offline.
2. Otherwise a GET of the dataset's Hub API page (`HF_ENDPOINT`, proxies from the environment) with
   a deadline decides (prune_core/hub_access.py; the answer is remembered for a minute).
3. Offline, `datasets` runs with its offline flags forced on, so a copy in the local Hugging Face
   cache (e.g. from earlier Wanda/SparseGPT runs) is still used; if there is none, `BadInput`.
   The flags are process-wide while that lookup runs (harmless: the Hub is unreachable anyway).

Sources (as in Wanda / SparseGPT): wikitext2 = `wikitext-2-raw-v1` train / test; c4 = the first
`allenai/c4` train shard / first validation shard, streamed and capped (`C4_MAX_CHARS`); ptb =
`ptb_text_only` train / test, field `sentence`. Rows are joined with a blank line ("\\n\\n").
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prune_core import hub_access
from prune_core.datasources import (
    DOC_SEPARATOR,
    SPLITS,
    Split,
    emit,
    read_text_cache,
    text_cache_present,
    write_text_cache,
)
from prune_core.errors import BadInput, PruneError, RunFailed
from prune_core.events import EventSink

_REPORT_EVERY_CHARS = 2_000_000

# c4 shards are hundreds of MB: keep whole documents, in order, until this many characters.
C4_MAX_CHARS: dict[Split, int] = {"calibration": 20_000_000, "evaluation": 8_000_000}


@dataclass(frozen=True)
class HubSource:
    key: str
    description: str
    repos: tuple[str, ...]  # first is canonical; the others are older names still found in caches
    config: str | None
    field: str
    splits: dict[Split, str]  # our split -> the dataset's split
    data_files: dict[Split, str] = field(default_factory=dict)  # our split -> file in the repo
    max_chars: dict[Split, int] = field(default_factory=dict)
    stream: bool = False  # stream from the Hub instead of downloading whole files


SOURCES: dict[str, HubSource] = {
    "wikitext2": HubSource(
        key="wikitext2",
        description="WikiText-2 raw (Salesforce/wikitext, wikitext-2-raw-v1): train → calibration, test → evaluation",
        repos=("Salesforce/wikitext", "wikitext"),
        config="wikitext-2-raw-v1",
        field="text",
        splits={"calibration": "train", "evaluation": "test"},
    ),
    "c4": HubSource(
        key="c4",
        description=(
            "C4 English (allenai/c4): en/c4-train.00000-of-01024 → calibration (first 20 M characters), "
            "en/c4-validation.00000-of-00008 → evaluation (first 8 M characters)"
        ),
        repos=("allenai/c4",),
        config=None,
        field="text",
        splits={"calibration": "train", "evaluation": "validation"},
        data_files={
            "calibration": "en/c4-train.00000-of-01024.json.gz",
            "evaluation": "en/c4-validation.00000-of-00008.json.gz",
        },
        max_chars=C4_MAX_CHARS,
        stream=True,
    ),
    "ptb": HubSource(
        key="ptb",
        description="Penn Treebank, text only (ptb_text_only, penn_treebank): train → calibration, test → evaluation",
        repos=("ptb-text-only/ptb_text_only", "ptb_text_only"),
        config="penn_treebank",
        field="sentence",
        splits={"calibration": "train", "evaluation": "test"},
    ),
}


def is_cached(key: str) -> bool:
    return text_cache_present(key)


def load(key: str, split: Split, on_event: EventSink | None = None) -> str:
    texts = read_text_cache(key)
    if texts is None:
        texts = _build_cache(SOURCES[key], on_event)
    return texts[split]


# ---------------------------------------------------------------------------------------------
# Online / offline
# ---------------------------------------------------------------------------------------------

def offline_from_env() -> bool:
    return hub_access.offline(datasets=True)


hub_endpoint = hub_access.endpoint
hub_reachable = hub_access.dataset_reachable  # a module name of its own: tests replace it here


@contextmanager
def _quiet_datasets(offline: bool) -> Iterator[Any]:
    """Import `datasets` with progress bars and warnings off, and its offline flags forced if asked."""
    import datasets
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    bars = datasets.is_progress_bar_enabled()
    ds_logger = logging.getLogger("datasets")
    level = ds_logger.level
    if offline:
        ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    ds_logger.setLevel(logging.ERROR)
    try:
        yield datasets
    finally:
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
        if bars:
            datasets.enable_progress_bars()
        ds_logger.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------

def _join_rows(rows: Iterable[Any], column: str, max_chars: int | None, on_event: EventSink | None,
               what: str) -> str:
    """Join the `column` of every row (whole rows, stopping once `max_chars` is reached)."""
    parts: list[str] = []
    size = 0
    next_report = _REPORT_EVERY_CHARS
    for row in rows:
        if column not in row:
            raise RunFailed(f"{what} has no '{column}' field (fields: {', '.join(sorted(row))})")
        value = row[column]
        text = "" if value is None else str(value)
        parts.append(text)
        size += len(text) + len(DOC_SEPARATOR)
        if max_chars is not None and size >= max_chars:
            break
        if size >= next_report:
            next_report += _REPORT_EVERY_CHARS
            emit(on_event, size, max_chars, "characters", f"reading {what}")
    return DOC_SEPARATOR.join(parts)


def _load_split(ds: Any, source: HubSource, split: Split, offline: bool) -> Any:
    """One split as an iterable of rows.

    Online, only the canonical repo is asked; if it is a script-based repo (unsupported by
    `datasets` >= 4), its automatic parquet conversion (`refs/convert/parquet`) is tried next.
    Offline, every known name of the repo is looked up in the local cache.
    """
    kwargs: dict[str, Any] = {"split": source.splits[split]}
    if source.config:
        kwargs["name"] = source.config
    if source.data_files:
        kwargs["data_files"] = {source.splits[split]: source.data_files[split]}
    if source.stream and not offline:
        kwargs["streaming"] = True
    errors: list[str] = []
    for repo in source.repos if offline else source.repos[:1]:
        try:
            return ds.load_dataset(repo, **kwargs)
        except Exception as exc:
            errors.append(f"{repo}: {type(exc).__name__}: {exc}".splitlines()[0])
            if offline or "script" not in str(exc).lower():
                continue
        try:
            return ds.load_dataset(repo, revision="refs/convert/parquet", **kwargs)
        except Exception as exc:
            errors.append(f"{repo}@refs/convert/parquet: {type(exc).__name__}: {exc}".splitlines()[0])
    raise _LoadError("; ".join(errors))


class _LoadError(Exception):
    pass


def _build_cache(source: HubSource, on_event: EventSink | None) -> dict[Split, str]:
    offline_env = offline_from_env()
    offline = offline_env or not hub_reachable(source.repos[0])
    how = "from the local Hugging Face cache" if offline else "from the Hugging Face Hub"
    texts: dict[Split, str] = {}
    with _quiet_datasets(offline) as ds:
        for i, split in enumerate(SPLITS):
            emit(on_event, i, len(SPLITS), "splits", f"loading {source.key} {source.splits[split]} {how}")
            what = f"{source.repos[0]} {source.splits[split]}"
            try:
                rows = _load_split(ds, source, split, offline)
                texts[split] = _join_rows(rows, source.field, source.max_chars.get(split), on_event, what)
            except PruneError:
                raise
            except Exception as exc:
                if offline and isinstance(exc, _LoadError):
                    reason = (
                        "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)"
                        if offline_env
                        else f"the Hugging Face Hub ({hub_endpoint()}) is unreachable"
                    )
                    raise BadInput(
                        f"dataset '{source.key}' ({source.repos[0]}) is not in the local cache and {reason}",
                        "run once with network access so it is downloaded and cached, or use a local file "
                        "(.txt, .jsonl, .parquet or a datasets save_to_disk folder), or the built-in "
                        "'shakespeare' dataset",
                    ) from exc
                raise RunFailed(
                    f"could not load dataset '{source.key}' ({source.repos[0]}) {how}: {exc}",
                    "check the network and try again, or use a local file or the built-in 'shakespeare' dataset",
                ) from exc
    emit(on_event, len(SPLITS), len(SPLITS), "splits", f"loaded {source.key}")
    info: dict[str, Any] = {
        "source": f"hub:{source.repos[0]}" + (f" {source.config}" if source.config else ""),
        "splits": dict(source.splits),
        "field": source.field,
    }
    if source.data_files:
        info["data_files"] = dict(source.data_files)
    if source.max_chars:
        info["max_characters"] = dict(source.max_chars)
    write_text_cache(source.key, texts, info)
    return texts
