"""Local text sources: a `.txt`, `.jsonl` or `.parquet` file, or a `datasets` `save_to_disk` folder.

- `.txt`: UTF-8 text (a BOM is ignored), taken whole.
- `.jsonl`: one JSON object per line with a string field `text`; blank lines are skipped.
- `.parquet`: a string column `text`.
- a `save_to_disk` folder of a `Dataset` (column `text`) or of a `DatasetDict`.

Documents (records, rows) are joined with a blank line. A single text is split by characters:
calibration = the first 90 %, evaluation = the last 10 % (see `split_single_text` for the exact cut).
A `DatasetDict` uses its own splits: calibration = "train" (else "validation" when "test" exists),
evaluation = "test", else "validation"; with only a "train" split, or a single split of any name,
that split is cut 90 % / 10 % like a single file. Local files are read on every call (no text cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prune_core.datasources import DOC_SEPARATOR, Split, emit, split_single_text
from prune_core.errors import BadInput
from prune_core.events import EventSink

TEXT_FIELD = "text"
SUPPORTED = (".txt", ".jsonl", ".parquet")
SUPPORTED_TEXT = ".txt, .jsonl (a 'text' field), .parquet (a 'text' column) or a datasets save_to_disk folder"
DESCRIPTION = "a local " + SUPPORTED_TEXT + "; single texts: first 90 % calibration, last 10 % evaluation"


def looks_like_path(dataset: str) -> bool:
    """Whether a dataset name should be read as a path (not a built-in name)."""
    return (
        "/" in dataset
        or "\\" in dataset
        or dataset.startswith((".", "~"))
        or Path(dataset).suffix != ""
        or Path(dataset).expanduser().exists()
    )


def load(dataset: str, split: Split, on_event: EventSink | None = None) -> str:
    path = Path(dataset).expanduser()
    if not path.exists():
        raise BadInput(f"dataset file '{dataset}' does not exist (looked at {path.absolute()})",
                       "check the path, or use a built-in dataset (run `prune datasets` to list them)")
    emit(on_event, 0, None, "", f"reading {path}")
    if path.is_dir():
        texts = _load_folder(path, dataset)
    else:
        suffix = path.suffix.lower()
        if suffix == ".txt":
            texts = split_single_text(_read_txt(path))
        elif suffix == ".jsonl":
            texts = split_single_text(_read_jsonl(path))
        elif suffix == ".parquet":
            texts = split_single_text(_read_parquet(path))
        else:
            raise BadInput(f"unsupported dataset file type '{path.suffix or path.name}' ({dataset})",
                           f"use one of: {SUPPORTED_TEXT}")
    emit(on_event, 1, 1, "", f"read {path}")
    return texts[split]


def _read_txt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                       "convert the file to UTF-8") from exc


def _read_jsonl(path: Path) -> str:
    docs: list[str] = []
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadInput(f"{path} line {lineno} is not valid JSON ({exc.msg})",
                                   "write one JSON object per line, e.g. {\"text\": \"...\"}") from exc
                if not isinstance(record, dict):
                    raise BadInput(f"{path} line {lineno} is a JSON {type(record).__name__}, not an object",
                                   "write one JSON object per line, e.g. {\"text\": \"...\"}")
                if TEXT_FIELD not in record:
                    fields = ", ".join(sorted(record)) or "none"
                    raise BadInput(f"{path} line {lineno} has no '{TEXT_FIELD}' field (fields found: {fields})",
                                   f"give every record a '{TEXT_FIELD}' field holding its text")
                value = record[TEXT_FIELD]
                if value is None:
                    continue
                if not isinstance(value, str):
                    raise BadInput(f"{path} line {lineno}: '{TEXT_FIELD}' is a {type(value).__name__}, not a string",
                                   f"make '{TEXT_FIELD}' a string")
                docs.append(value)
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path} is not UTF-8 text ({exc.reason})", "convert the file to UTF-8") from exc
    return DOC_SEPARATOR.join(docs)


def _check_string_type(arrow_type: Any, where: str) -> None:
    import pyarrow as pa

    if not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
            or pa.types.is_null(arrow_type)):
        raise BadInput(f"the '{TEXT_FIELD}' column of {where} holds {arrow_type}, not strings",
                       f"store the text as a string column named '{TEXT_FIELD}'")


def _read_parquet(path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise BadInput(f"{path} is not a readable parquet file ({exc})", "check the file") from exc
    if TEXT_FIELD not in schema.names:
        raise BadInput(f"{path} has no '{TEXT_FIELD}' column (columns found: {', '.join(schema.names) or 'none'})",
                       f"rename the column holding the text to '{TEXT_FIELD}'")
    _check_string_type(schema.field(TEXT_FIELD).type, str(path))
    column = pq.read_table(path, columns=[TEXT_FIELD]).column(TEXT_FIELD)
    return DOC_SEPARATOR.join(v for v in column.to_pylist() if v is not None)


def _dataset_text(ds: Any, where: str) -> str:
    names = list(ds.column_names)
    if TEXT_FIELD not in names:
        raise BadInput(f"{where} has no '{TEXT_FIELD}' column (columns found: {', '.join(names) or 'none'})",
                       f"rename the column holding the text to '{TEXT_FIELD}' (Dataset.rename_column)")
    table = ds.select_columns([TEXT_FIELD]).with_format("arrow")[:]
    column = table.column(TEXT_FIELD)
    _check_string_type(column.type, where)
    return DOC_SEPARATOR.join(v for v in column.to_pylist() if v is not None)


def choose_splits(names: list[str]) -> tuple[str | None, str | None]:
    """(calibration split, evaluation split) of a DatasetDict; (name, None) means cut `name` 90/10."""
    evaluation = "test" if "test" in names else ("validation" if "validation" in names else None)
    if "train" in names:
        calibration: str | None = "train"
    elif evaluation == "test" and "validation" in names:
        calibration = "validation"
    else:
        calibration = None
    if calibration and evaluation:
        return calibration, evaluation
    if "train" in names:
        return "train", None
    if len(names) == 1:
        return names[0], None
    return None, None


def _load_folder(path: Path, dataset: str) -> dict[Split, str]:
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not (path / "state.json").is_file():
        raise BadInput(f"folder '{dataset}' is not a datasets save_to_disk folder (no dataset_dict.json or state.json)",
                       f"save it with Dataset.save_to_disk, or point to a file: {SUPPORTED_TEXT}")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise BadInput(f"could not read the datasets folder '{dataset}': {exc}",
                       "save it again with Dataset.save_to_disk / DatasetDict.save_to_disk") from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded.keys())
        calibration, evaluation = choose_splits(names)
        if calibration is None:
            raise BadInput(f"cannot tell the calibration and evaluation splits of '{dataset}' "
                           f"(splits found: {', '.join(names) or 'none'})",
                           "name the splits 'train' and 'test' (or 'validation')")
        if evaluation is None:
            return split_single_text(_dataset_text(loaded[calibration], f"{dataset} [{calibration}]"))
        return {
            "calibration": _dataset_text(loaded[calibration], f"{dataset} [{calibration}]"),
            "evaluation": _dataset_text(loaded[evaluation], f"{dataset} [{evaluation}]"),
        }
    return split_single_text(_dataset_text(loaded, dataset))
