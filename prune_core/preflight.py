"""Checks made before any expensive work: `prune validate` and the start of `pipeline.run` share them.

`problems(session)` lists (key, message) pairs for everything that can be known without loading
weights or tokenizing text: the model is reachable (a built-in key, an existing local folder or
.gguf file, a hub id), the device exists here, layer indices fit the model's config (when the config
is at hand: built-in tiny models, cached built-ins, local folders), dataset paths exist, a local text
is long enough for the calibration windows, the correction windows and one evaluation window (a
token covers at least one byte, so a split with fewer bytes than tokens needed is surely too short),
and `[evaluation] max_tokens` holds at least one window. `check()` raises them all at once as a
`SessionError` (BadInput, exit code 2); `before_run()` adds the results-folder check (`--out` never
overwrites files a results folder does not own). Nothing here writes a file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from prune_core.errors import BadInput
from sessions import Session, SessionError, check_against_model

Problem = tuple[str, str]
# local texts up to this size are read to measure their splits (larger ones are long enough)
MEASURE_BELOW = 64 << 20


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


def _text_bytes(name: str) -> dict[str, int] | None:
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
    elif kind == "local" and (sizes := _text_bytes(d.dataset)) is not None:
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
        elif (not eproblem and ekind == "local" and (sizes := _text_bytes(name)) is not None
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


def problems(session: Session) -> list[Problem]:
    """Every problem that can be found before loading weights or tokenizing text."""
    return model_problems(session) + data_problems(session)


def check(session: Session, source: str = "session") -> None:
    """Raise SessionError (BadInput) listing every pre-flight problem of `session`."""
    found = problems(session)
    if found:
        raise SessionError(found, source=source)


def before_run(session: Session, results_dir: Path | None, *, write: bool = True) -> None:
    """The checks at the start of `pipeline.run`: the session's pre-flight and the results folder."""
    from prune_core.report import check_out_folder

    if results_dir is not None and write:
        check_out_folder(results_dir)
    check(session)
