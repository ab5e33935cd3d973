"""Checks made before any expensive work: `prune validate` and the start of `pipeline.run` share them.

`problems(session)` lists (key, message) pairs for everything that can be known without loading
weights or tokenizing text: the model is reachable (a built-in key, an existing local folder or
.gguf file, a hub id), the device exists here, layer indices fit the model's config (when the config
is at hand: built-in tiny models, cached built-ins, local folders), dataset paths exist, a local text
is long enough for the calibration windows, the correction windows and one evaluation window (a
token covers at least one byte, so a split with fewer bytes than tokens needed is surely too short),
and `[evaluation] max_tokens` holds at least one window. Built-in and hub texts are measured the
same way once their extracted text is cached. The results folder (`<output_dir>/<name>`, or `--out`)
can be made and written: no part of its path is a file or a device, every name fits the file system
and the folder, or the nearest existing folder above it, is writable (permissions, read-only file
systems), and an existing folder that is not a results folder holds no files but prune's own
(`report.check_out_folder`: `--out` never overwrites the user's files), and its file system has room
for the pruned model the run saves (priced from the model's config when that is on this machine,
diskplan.py). `check()` raises them all
at once as a `SessionError` (BadInput, exit code 2); `prune validate` checks <output_dir>/<name>,
`before_run()` (a writing `pipeline.run`) the folder the run writes. Nothing here writes a file.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from pathlib import Path

from prune_core.diskplan import disk_bytes, shortfall
from prune_core.errors import BadInput, PruneError
from sessions import Session, SessionError, check_against_model

Problem = tuple[str, str]
# local texts up to this size are read to measure their splits (larger ones are long enough)
MEASURE_BELOW = 64 << 20
# bytes a run adds below its results folder (state/checkpoints/importance-<key>/.<file>.<random>.tmp, ...)
DEEPEST_INSIDE = 160


def _with_fix(exc: BadInput) -> str:
    return f"{exc.message} (fix: {exc.fix})" if exc.fix else exc.message


@functools.lru_cache(maxsize=32)
def _device_problem(device: str) -> str | None:
    from prune_core.models import resolve_device

    try:
        resolve_device(device)
    except BadInput as exc:
        return _with_fix(exc)
    return None


def _config_layers(folder: Path) -> int | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        layers = json.loads(config.read_text(encoding="utf-8")).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else None


@functools.lru_cache(maxsize=32)
def _model_facts(spec: str, revision: str) -> tuple[str | None, int | None]:
    """(problem, number of layers when known) for a model spec, without loading weights."""
    from prune_core import tiny, zoo
    from prune_core.models import _classify

    spec = spec.strip()
    if spec in tiny.TINY_MODELS:
        return None, int(tiny.make_config(spec).num_hidden_layers)
    if spec in zoo.ZOO:
        return None, _config_layers(zoo.model_dir(spec)) if zoo.is_cached(spec) else None
    path = Path(spec).expanduser()
    if (path / "pruning.json").is_file():
        return None, _config_layers(path)
    try:
        source = _classify(spec, revision)
    except BadInput as exc:
        return _with_fix(exc), None
    if path.is_dir():
        if (path / "config.json").is_file():  # transformers must accept it (e.g. hidden size a multiple of heads)
            from prune_core.memplan_geometry import load_config

            try:
                load_config(str(path), revision=revision)
            except BadInput as exc:
                return _with_fix(exc), None
        return None, _config_layers(path)
    if getattr(source, "is_hub", False) and getattr(source, "local_only", False):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json", revision=revision or None)
        except Exception:  # the cache lookup is a courtesy; loading reports its own errors
            cached = None
        if not isinstance(cached, str):
            return (f"the hub is not reachable and {spec!r} is not in the local Hugging Face cache "
                    "(fix: connect to the network once, or use a local model folder)"), None
        return None, _config_layers(Path(cached).parent)
    return None, None


def _dataset_kind(name: str) -> tuple[str | None, str | None]:
    """(kind, problem) of a dataset name: builtin, hub or local."""
    from prune_core.data import _resolve

    try:
        kind, _ = _resolve(name)
    except BadInput as exc:
        return None, _with_fix(exc)
    if kind == "local" and not Path(name).expanduser().exists():
        return kind, (f"no such file or folder: {name} (fix: check the path; relative paths start from the "
                      "current folder)")
    return kind, None


@functools.lru_cache(maxsize=16)
def _split_bytes(name: str, mtime: float, size: int) -> dict[str, int] | None:
    """UTF-8 bytes of the calibration and evaluation splits of a single local .txt file (None: unknown)."""
    from prune_core.datasources import split_single_text

    path = Path(name).expanduser()
    if not path.is_file() or path.suffix.lower() != ".txt" or size > MEASURE_BELOW:
        return None
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return None  # the loader reports an unreadable file with its own message
    return {k: len(v.encode("utf-8")) for k, v in split_single_text(text).items()}


def _cached_text_bytes(key: str) -> dict[str, int] | None:
    """UTF-8 bytes of the splits of a built-in or hub text whose extracted text is cached (None: not cached)."""
    from prune_core.datasources import CACHE_FORMAT, SPLITS, text_cache_dir

    folder = text_cache_dir(key)
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
            return None
        return {split: (folder / f"{split}.txt").stat().st_size for split in SPLITS}
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _text_bytes(name: str, kind: str | None = "local") -> dict[str, int] | None:
    """UTF-8 bytes of each split of a dataset, where they can be known without reading much (else None)."""
    if kind in ("builtin", "hub"):
        from prune_core.data import _resolve

        return _cached_text_bytes(_resolve(name)[1])
    if kind != "local":
        return None
    path = Path(name).expanduser()
    try:
        st = path.stat()
    except OSError:
        return None
    return _split_bytes(name, st.st_mtime, st.st_size)


def data_problems(session: Session) -> list[Problem]:
    """Dataset names and paths, and whether a local text holds enough tokens for every window."""
    problems: list[Problem] = []
    d, c, e = session.data, session.correction, session.evaluation
    kind, problem = _dataset_kind(d.dataset)
    if problem:
        problems.append(("data.dataset", problem))
    elif (sizes := _text_bytes(d.dataset, kind)) is not None:
        have = sizes["calibration"]
        windows = d.num_samples + d.proxy_samples
        if have < d.seq_len + 1:
            problems.append(("data.seq_len", f"the calibration split of {d.dataset} has at most {have} tokens, "
                                             f"fewer than seq_len + 1 = {d.seq_len + 1}"))
        elif have - d.seq_len + 1 < windows:
            problems.append(("data.num_samples",
                             f"the calibration split of {d.dataset} has at most {max(have - d.seq_len + 1, 0)} "
                             f"windows of {d.seq_len} tokens, fewer than num_samples + proxy_samples = {windows}"))
        needs_block = c.temperature != 0.0 or c.tau != 0.0
        if needs_block and (have < c.seq_len + 1 or have - c.seq_len + 1 < c.samples):
            problems.append(("correction.samples",
                             f"the calibration split of {d.dataset} has too few tokens for {c.samples} "
                             f"correction windows of {c.seq_len} tokens (at most {max(have - c.seq_len + 1, 0)})"))
    if e.before or e.after:
        if e.max_tokens < e.seq_len:
            problems.append(("evaluation.max_tokens",
                             f"{e.max_tokens} tokens make no window of evaluation seq_len {e.seq_len}"))
        name = session.eval_dataset
        ekind, eproblem = _dataset_kind(name)
        if eproblem and name != d.dataset:
            problems.append(("evaluation.dataset", eproblem))
        elif (not eproblem and (sizes := _text_bytes(name, ekind)) is not None
              and sizes["evaluation"] < e.seq_len):
            problems.append(("evaluation.seq_len",
                             f"the evaluation split of {name} has at most {sizes['evaluation']} tokens, too few "
                             f"for one window of seq_len {e.seq_len} (use a smaller seq_len or more text)"))
    return problems


def model_problems(session: Session) -> list[Problem]:
    """The model is reachable, the device exists, layer indices fit the model (when its config is at hand)."""
    problems: list[Problem] = []
    m = session.model
    device = _device_problem(m.device)
    if device:
        problems.append(("model.device", device))
    problem, layers = _model_facts(m.id, m.revision)
    if problem:
        problems.append(("model.id", problem))
    elif layers is not None:
        problems.extend(check_against_model(session, layers))
    return problems


def _pathconf(folder: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError):
        return default
    return value if value > 0 else default


def _nearest_existing(path: Path) -> Path:
    """`path` itself or the nearest folder above it that exists (a file there stops the walk too)."""
    for candidate in (path, *path.parents):
        try:
            os.stat(candidate)
        except OSError:
            continue
        return candidate
    return Path(path.anchor or "/")


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _clip(text: str, keep: int = 40) -> str:
    return text if len(text) <= keep else f"{text[:keep]}… ({len(text)} characters)"


def folder_problems(session: Session, results_dir: Path | None = None) -> list[Problem]:
    """The results folder (`results_dir`, default <output_dir>/<name>) can be made and written here."""
    default = Path(session.session.output_dir).expanduser() / session.session.name
    given = Path(results_dir).expanduser() if results_dir is not None else default
    key = "session.output_dir" if given == default else "--out"
    other = "choose another --out folder" if key == "--out" else "set session.output_dir to another folder"
    shorter = "choose a shorter --out folder" if key == "--out" else "use a shorter session.output_dir"
    path = Path(os.path.abspath(given))
    existing = _nearest_existing(path)
    name_max = _pathconf(existing, "PC_NAME_MAX", 255)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            return [(key, f"the folder name {_clip(part)!r} is {size} bytes long, more than the {name_max} "
                          f"this file system allows (fix: {shorter})")]
    size, path_max = len(os.fsencode(str(path))), _pathconf(existing, "PC_PATH_MAX", 4096)
    if size + DEEPEST_INSIDE > path_max:
        return [(key, f"the results folder path is {size} bytes long: the files a run writes inside it would "
                      f"pass the {path_max}-byte limit on paths (fix: {shorter})")]
    try:
        mode = os.stat(existing).st_mode
    except OSError as exc:
        return [(key, f"cannot look at {str(existing)!r} ({exc.strerror}) (fix: {other})")]
    if not stat.S_ISDIR(mode):
        what = "a file" if stat.S_ISREG(mode) else "a device, pipe or socket"
        where = ("the results cannot go there" if existing == path
                 else f"the results folder {str(path)!r} cannot be made inside it")
        return [(key, f"{str(existing)!r} is {what}, not a folder: {where} (fix: {other})")]
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only_fs(existing) else "is not writable by this user"
        what = ("the results folder" if existing == path
                else f"the folder the results folder {str(path)!r} would be made in")
        return [(key, f"{str(existing)!r} ({what}) {why} (fix: {other}, or make it writable: "
                      f"chmod u+w {str(existing)!r})")]
    if existing == path:
        from prune_core.report import check_out_folder

        try:
            check_out_folder(path)
        except BadInput as exc:
            return [(key, _with_fix(exc))]
    return disk_problems(session, path, key, other)


@functools.lru_cache(maxsize=16)
def _local_parameters(spec: str, revision: str) -> tuple[tuple[str, int], ...] | None:
    """The parameter counts of a model whose config is on this machine (a built-in tiny model, a cached
    built-in, a local folder that is not a pruned model's); None for any other (nothing is fetched)."""
    from prune_core import tiny, zoo
    from prune_core.memplan_geometry import geometry_from_config, load_config

    spec = spec.strip()
    path = Path(spec).expanduser()
    local = spec in tiny.TINY_MODELS or (spec in zoo.ZOO and zoo.is_cached(spec)) or (
        path.is_dir() and (path / "config.json").is_file() and not (path / "pruning.json").is_file())
    if not local:
        return None
    try:
        return tuple(geometry_from_config(load_config(spec, revision=revision)[0]).parameters.items())
    except (PruneError, ValueError, KeyError, OSError):  # model_problems reports what is wrong with the model
        return None


def disk_problems(session: Session, folder: Path, key: str, other: str) -> list[Problem]:
    """The file system under the results folder has room for the pruned model the run saves (priced from
    the model's config when it is on this machine; diskplan.py); checkpoints guard themselves."""
    if not session.output.save_model:
        return []
    counts = _local_parameters(session.model.id, session.model.revision)
    if counts is None:
        return []
    import torch

    element = getattr(torch, session.model.dtype).itemsize
    need = disk_bytes(dict(counts), {}, element_bytes=element, ratio=session.pruning.ratio)["saved_model"]
    free = shortfall(folder, need)
    if free is None:
        return []
    return [(key, f"the pruned model this run saves needs about {need / 2**30:.2f} GiB and the file system under "
                  f"{str(_nearest_existing(folder))!r} has {free / 2**30:.2f} GiB free (fix: free disk space, "
                  f"{other}, or set output.save_model = false)")]


def problems(session: Session, results_dir: Path | None = None, *, folder: bool = True) -> list[Problem]:
    """Every problem that can be found before loading weights or tokenizing text (`folder`: the results
    folder's too, `results_dir` or <output_dir>/<name>)."""
    found = model_problems(session) + data_problems(session)
    return found + folder_problems(session, results_dir) if folder else found


def check(session: Session, source: str = "session", results_dir: Path | None = None, *,
          folder: bool = True) -> None:
    """Raise SessionError (BadInput) listing every pre-flight problem of `session`."""
    found = problems(session, results_dir, folder=folder)
    if found:
        raise SessionError(found, source=source)


def before_run(session: Session, results_dir: Path | None, *, write: bool = True) -> None:
    """The checks at the start of `pipeline.run`: the session's pre-flight and, for a writing run, the
    results folder's (`results_dir`)."""
    check(session, results_dir=results_dir, folder=write and results_dir is not None)
