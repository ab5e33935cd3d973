"""Zero-shot (and few-shot) task accuracy of a saved pruned model through lm-eval (`prune eval --tasks`).

Papers and users compare pruned models on the EleutherAI lm-evaluation-harness tasks (arc_easy,
hellaswag, piqa, …), so this module runs exactly that library instead of re-implementing its tasks:
our model, rebuilt by `prune_core.export.load_pruned` (per-layer widths, removed blocks and
compensation biases included), is wrapped in lm-eval's `HFLM(pretrained=model, tokenizer=tok)` and
evaluated by `lm_eval.simple_evaluate`. The numbers are therefore the ones lm-eval itself gives for
this model (a test checks that they are identical to a direct `simple_evaluate` call).

Offline first. `prepare_tasks` builds every task (which loads its data set) *before* the model is
loaded, from the local Hugging Face cache only: a task whose data is not cached fails in seconds with
`BadInput` naming the task, its data set and the fix. Only when that cache-only attempt fails, the
offline flags (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE) are unset and the Hub
answers (the same probe as `prune_core.datasources.hub`; data from elsewhere, e.g. a URL, is simply
tried), the missing tasks are downloaded.
Local tasks come from `--include-path DIR` (lm-eval task YAMLs; `dataset_path: json` with
`dataset_kwargs.data_files` for a local .jsonl, paths relative to the working directory).
An included YAML may name Python functions next to it (`!function utils.fn`), which lm-eval imports:
include only task folders you trust.

`summarize` turns lm-eval's output into our record: per task its metrics (lm-eval's own keys, e.g.
`acc,none` and `acc_stderr,none`), version, number of shots, samples, the task hash lm-eval's
EvaluationTracker computes (sha256 over every sample's doc, prompt and target hashes) and the sha256
of the task config lm-eval reports, plus the lm-eval version. `write_results` stores it atomically;
in a results folder, `zeroshot.json` accumulates tasks evaluated on the same weights (by sha256).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_core import atomic
from prune_core.errors import BadInput, RunFailed

FORMAT = "prune.zeroshot"
FORMAT_VERSION = 1
RESULTS_FILE = "zeroshot.json"  # in a results folder, next to metrics.json
LM_EVAL_REQUIREMENT = "lm-eval>=0.4.13,<0.5"
_RESERVED_KEYS = {"name", "alias", "sample_len", "sample_count"}
_REPO_IN_ERROR = re.compile(r"Couldn't reach '([^']+)'")

Say = Callable[[str], None]


def require_lm_eval() -> Any:
    """The `lm_eval` module, or BadInput saying exactly how to install it into this environment."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401  (its import needs torch + transformers)
    except ImportError as exc:
        raise BadInput(
            f"zero-shot evaluation (--tasks) needs the lm-eval package, which cannot be imported here ({exc})",
            f"install it into this environment: {sys.executable} -m pip install \"{LM_EVAL_REQUIREMENT}\" "
            "(`make install` does it), or run `prune eval` without --tasks for perplexity",
        ) from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """`arc_easy, hellaswag,arc_easy` → ["arc_easy", "hellaswag"] (order kept, duplicates dropped)."""
    names: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if name and name not in names:
            names.append(name)
    if not names:
        raise BadInput("--tasks names no task", "pass comma-separated lm-eval task names, e.g. --tasks arc_easy,hellaswag")
    return names


def check_settings(*, batch_size: str, limit: float | None, num_fewshot: int | None) -> int | str:
    """Validate the lm-eval knobs; returns the batch size as lm-eval takes it (an int, "auto" or "auto:N")."""
    if limit is not None and not limit > 0:
        raise BadInput(f"--limit {limit:g} is not positive",
                       "pass a number of samples per task (e.g. 100) or a fraction below 1 (e.g. 0.1)")
    if limit is not None and limit >= 1 and limit != int(limit):
        raise BadInput(f"--limit {limit:g} is neither a whole number of samples nor a fraction below 1",
                       "pass e.g. --limit 100 or --limit 0.1")
    if num_fewshot is not None and num_fewshot < 0:
        raise BadInput(f"--num-fewshot {num_fewshot} is negative", "pass 0 (zero-shot) or a positive number")
    text = batch_size.strip().lower()
    if re.fullmatch(r"auto(:\d+)?", text):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise BadInput(f"--batch-size {batch_size!r} is not a positive number or 'auto'",
                   "pass e.g. --batch-size 8, or --batch-size auto to let lm-eval find the largest that fits")


# ----------------------------------------------------------------------------- offline / quiet


def offline_from_env() -> bool:
    from prune_core.datasources.hub import offline_from_env as from_env

    return from_env()


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """Force the `datasets` / `huggingface_hub` offline flags (read at import time) while inside."""
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    saved = (ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE)
    if offline:
        ds_config.HF_HUB_OFFLINE = ds_config.HF_DATASETS_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        ds_config.HF_HUB_OFFLINE, ds_config.HF_DATASETS_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """lm-eval and datasets log every step at INFO/WARNING and draw data-set progress bars: keep stderr
    for our own messages and lm-eval's request progress bars (all of it with `verbose`)."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets")]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    if not verbose:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


# ----------------------------------------------------------------------------- tasks


@dataclass
class PreparedTasks:
    """Tasks built (data loaded) before the model: what `evaluate` hands to `simple_evaluate`."""

    names: list[str]
    objects: list[Any]  # lm-eval Task / Group objects, data already loaded
    task_manager: Any
    include_path: Path | None
    offline: bool  # data came from the local cache only
    leaves: dict[str, str] = field(default_factory=dict)  # every leaf task → the name asked for


@dataclass
class _Failure:
    name: str
    exc: BaseException

    @property
    def not_cached(self) -> bool:
        text = str(self.exc).lower()
        return isinstance(self.exc, ConnectionError) or "offline" in text or "couldn't reach" in text

    @property
    def repo(self) -> str | None:
        match = _REPO_IN_ERROR.search(str(self.exc))
        return match.group(1) if match else None

    def first_line(self) -> str:
        lines = str(self.exc).strip().splitlines()
        return f"{type(self.exc).__name__}: {lines[0] if lines else ''}"


def _task_manager(include_path: Path | None, names: Sequence[str]) -> Any:
    """lm-eval's TaskManager. Indexing its ~10,000 built-in YAMLs takes seconds, so when every name asked
    for is a plain task of the include path (not a group or tag, which may name built-in tasks), the
    include path alone is indexed: the same task configs, as included paths override built-ins anyway."""
    from lm_eval.tasks import TaskManager

    if include_path is None:
        return TaskManager()
    if not include_path.exists():
        raise BadInput(f"--include-path {include_path} does not exist",
                       "pass a folder holding lm-eval task YAML files")
    if not include_path.is_dir():
        raise BadInput(f"--include-path {include_path} is not a folder",
                       "pass the folder that holds the task YAML, not the file itself")
    local = TaskManager(include_path=str(include_path), include_defaults=False)
    index = local.task_index
    if all(getattr(getattr(index.get(n), "kind", None), "name", "") in ("TASK", "PY_TASK") for n in names):
        return local
    return TaskManager(include_path=str(include_path))


def _check_names(names: Sequence[str], tm: Any, include_path: Path | None) -> None:
    known = set(tm.all_tasks)
    unknown = [n for n in names if n not in known]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"lm-eval's built-in tasks or {include_path}" if include_path else "lm-eval's built-in tasks"
    raise BadInput(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: not among {where}",
                   "check the name (`lm-eval ls tasks` lists them), or pass --include-path DIR with your "
                   "own task YAML")


def _build(tm: Any, name: str) -> tuple[list[Any], list[str]]:
    """Build one requested task / group / tag (its data is loaded here): top-level objects, leaf names."""
    loaded = tm.load(name)
    tasks, groups = loaded["tasks"], loaded.get("groups") or {}
    if name in groups:
        top: list[Any] = [groups[name]]
    elif name in tasks:
        top = [tasks[name]]
    else:  # a tag: the tasks it names
        top = list(tasks.values())
    return top, list(tasks)


def _hub_reachable(repo: str) -> bool:
    from prune_core.datasources.hub import hub_reachable

    return hub_reachable(repo)


def _not_cached_error(failures: list[_Failure], reason: str) -> BadInput:
    parts = []
    for f in failures:
        parts.append(f"{f.name!r}" + (f" (data set {f.repo})" if f.repo else f" ({f.first_line()})"))
    names = ",".join(f.name for f in failures)
    return BadInput(
        f"the data of task{'s' if len(failures) > 1 else ''} {', '.join(parts)} is not in the local Hugging Face "
        f"datasets cache and {reason}",
        f"download it once on a machine with network access and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE unset "
        f"(e.g. `python -c \"from lm_eval.tasks import TaskManager; TaskManager().load({names.split(',')!r})\"` "
        "builds the tasks and so downloads their data), "
        "then copy the Hugging Face cache (~/.cache/huggingface, or $HF_HOME) to this machine; or define the task "
        "on local files (a task YAML with dataset_path: json and dataset_kwargs.data_files) and pass "
        "--include-path DIR",
    )


def _setup_error(failure: _Failure) -> BadInput | None:
    """BadInput for a task whose definition or local data is wrong; None for anything else."""
    exc = failure.exc
    if isinstance(exc, FileNotFoundError):
        return BadInput(f"task {failure.name!r}: its data cannot be found ({failure.first_line()})",
                        "check the task's dataset_path / data_files (relative paths are relative to the "
                        "working directory, as in `datasets.load_dataset`)")
    if isinstance(exc, (ValueError, KeyError, TypeError, AttributeError)) or type(exc).__module__.startswith("yaml"):
        return BadInput(f"task {failure.name!r} could not be set up ({failure.first_line()})",
                        "check the task's YAML against lm-eval's task format (run again with --debug for the "
                        "full traceback)")
    return None


def prepare_tasks(names: Sequence[str], include_path: Path | None = None, *, say: Say | None = None,
                  verbose: bool = False) -> PreparedTasks:
    """Find and build every task (loading its data) before any model work; see the module docstring."""
    say = say or (lambda _msg: None)
    require_lm_eval()
    with quiet_libraries(verbose):
        say("indexing lm-eval tasks" + (f" (and {include_path})" if include_path else ""))
        tm = _task_manager(include_path, names)
        _check_names(names, tm, include_path)
        built: dict[str, tuple[list[Any], list[str]]] = {}
        failures: list[_Failure] = []
        say("loading task data from the local cache")
        with hub_offline(True):
            for name in names:
                try:
                    built[name] = _build(tm, name)
                except Exception as exc:
                    failures.append(_Failure(name, exc))
        offline = True
        missing = [f for f in failures if f.not_cached]
        for f in failures:
            if not f.not_cached:
                err = _setup_error(f)
                if err is None:
                    raise f.exc
                raise err from f.exc
        if missing:
            if offline_from_env():
                raise _not_cached_error(missing, "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / "
                                                 "TRANSFORMERS_OFFLINE)")
            probe = next((f.repo for f in missing if f.repo), None)  # None: data not on the Hub (a URL)
            if probe is not None and not _hub_reachable(probe):
                from prune_core.datasources.hub import hub_endpoint

                raise _not_cached_error(missing, f"the Hugging Face Hub ({hub_endpoint()}) is unreachable")
            offline = False
            for f in missing:
                say(f"downloading the data of task {f.name!r}")
                try:
                    built[f.name] = _build(tm, f.name)
                except Exception as exc:
                    again = _Failure(f.name, exc)
                    err = _setup_error(again)
                    if err is None:
                        raise RunFailed(f"could not download the data of task {f.name!r}: {again.first_line()}",
                                        "check the network and try again, or use a local task (--include-path)") from exc
                    raise err from exc
        objects = [obj for name in names for obj in built[name][0]]
        leaves = {leaf: name for name in names for leaf in built[name][1]}
        try:
            tm.load(objects)  # lm-eval's own check that no task is asked for twice (e.g. in two groups)
        except ValueError as exc:
            raise BadInput(f"--tasks {','.join(names)}: {exc}", "ask for each task once") from None
    return PreparedTasks(list(names), objects, tm, include_path, offline, leaves)


# ----------------------------------------------------------------------------- evaluation


def evaluate(model: Any, tokenizer: Any, prepared: PreparedTasks, *, batch_size: int | str = 1,
             limit: float | None = None, num_fewshot: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """lm_eval.simple_evaluate on our model wrapped in HFLM; returns lm-eval's own result dict."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if limit is not None and limit >= 1:
        limit = int(limit)
    with quiet_libraries(verbose), hub_offline(prepared.offline):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = lm_eval.simple_evaluate(model=lm, tasks=list(prepared.objects), task_manager=prepared.task_manager,
                                      num_fewshot=num_fewshot, limit=limit, batch_size=batch_size,
                                      log_samples=True)
    if raw is None:  # only on a non-zero rank of a distributed run, which prune never starts
        raise RunFailed("lm-eval returned no results", "run prune eval as a single process")
    return raw


def task_hash(samples: Sequence[dict[str, Any]]) -> str:
    """lm-eval's task hash (EvaluationTracker): sha256 over every sample's doc + prompt + target hashes."""
    text = "".join(str(s.get("doc_hash", "")) + str(s.get("prompt_hash", "")) + str(s.get("target_hash", ""))
                   for s in samples)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    """JSON-ready: numbers, strings, lists and dicts stay; anything else (a torch dtype) becomes its str."""
    return json.loads(json.dumps(value, default=str))


def summarize(raw: dict[str, Any], *, model_dir: Path, weights_sha256: str, settings: dict[str, Any],
              seconds: float) -> dict[str, Any]:
    """Our record of one `prune eval --tasks` (see the module docstring)."""
    version = str(raw.get("lm_eval_version") or "")
    if not version:
        import lm_eval

        version = str(getattr(lm_eval, "__version__", ""))
    groups_raw = raw.get("groups") or {}
    samples = raw.get("samples") or {}
    configs = raw.get("configs") or {}
    tasks: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for name, entry in (raw.get("results") or {}).items():
        metrics = {k: v for k, v in entry.items() if k not in _RESERVED_KEYS}
        if name in groups_raw:
            groups[name] = {"metrics": _plain(metrics), "tasks": list((raw.get("group_subtasks") or {}).get(name, []))}
            continue
        n = (raw.get("n-samples") or {}).get(name, {})
        cfg = configs.get(name)
        tasks[name] = {
            "metrics": _plain(metrics),
            "version": _plain((raw.get("versions") or {}).get(name)),
            "n_shot": _plain((raw.get("n-shot") or {}).get(name)),
            "samples": {"evaluated": n.get("effective"), "total": n.get("original")},
            "higher_is_better": _plain((raw.get("higher_is_better") or {}).get(name, {})),
            "task_hash": task_hash(samples[name]) if name in samples else None,
            "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode("utf-8")).hexdigest()
            if cfg is not None else None,
            "lm_eval_version": version,
            "settings": settings,
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_dir": str(model_dir),
        "weights_sha256": weights_sha256,
        "lm_eval_version": version,
        "transformers_version": raw.get("transformers_version"),
        "settings": settings,
        "tasks": tasks,
        "groups": groups,
        "seconds": round(seconds, 3),
    }


def run(model_dir: Path, names: Sequence[str], *, include_path: Path | None = None, device: str = "auto",
        batch_size: str = "1", limit: float | None = None, num_fewshot: int | None = None,
        say: Say | None = None, verbose: bool = False) -> dict[str, Any]:
    """The whole `prune eval --tasks`: check, build the tasks, load the model, evaluate, summarize."""
    from prune_core.digest import file_sha256
    from prune_core.export import WEIGHTS, load_pruned, read_recipe
    from prune_core.models import resolve_device

    say = say or (lambda _msg: None)
    start = time.monotonic()
    bs = check_settings(batch_size=batch_size, limit=limit, num_fewshot=num_fewshot)
    read_recipe(model_dir)  # a pruned-model folder, before any slow work
    torch_device = resolve_device(device)
    prepared = prepare_tasks(names, include_path, say=say, verbose=verbose)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise BadInput(f"{weights} is missing", "save the model again with `prune run` ([output] save_model = true)")
    weights_sha = file_sha256(weights)  # what was evaluated (hashed before loading it)
    say(f"loading the pruned model from {model_dir} on {torch_device}")
    model, tokenizer = load_pruned(model_dir, device=torch_device)
    if tokenizer is None:
        raise BadInput(f"the pruned model folder {model_dir} holds no tokenizer",
                       "save it again with `prune run` ([output] save_model = true), which stores the tokenizer")
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    say(f"evaluating {', '.join(names)} with lm-eval")
    raw = evaluate(model, tokenizer, prepared, batch_size=bs, limit=limit, num_fewshot=num_fewshot, verbose=verbose)
    settings = {"tasks": list(names), "include_path": str(include_path) if include_path else None,
                "limit": limit, "num_fewshot": num_fewshot, "batch_size": bs, "device": str(torch_device),
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                "data": "local cache" if prepared.offline else "downloaded"}
    return summarize(raw, model_dir=model_dir, weights_sha256=weights_sha, settings=settings,
                     seconds=time.monotonic() - start)


# ----------------------------------------------------------------------------- results files


def write_results(path: Path, summary: dict[str, Any], *, merge: bool = False) -> Path:
    """Write `summary` as JSON atomically. `merge`: keep the tasks an earlier file recorded for the same
    weights (same sha256) that this run did not evaluate again (a results folder's zeroshot.json)."""
    doc = summary
    if merge and path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            old = None
        if (isinstance(old, dict) and old.get("format") == FORMAT
                and old.get("weights_sha256") == summary["weights_sha256"]):
            doc = {**summary,
                   "tasks": {**(old.get("tasks") or {}), **summary["tasks"]},
                   "groups": {**(old.get("groups") or {}), **summary["groups"]}}
    atomic.write_json(path, doc)
    return path


def rows(summary: dict[str, Any]) -> list[tuple[str, str, Any, Any, str]]:
    """(task, metric, value, stderr, samples) for a table: lm-eval's `metric,filter` keys, filter `none` hidden."""
    out: list[tuple[str, str, Any, Any, str]] = []
    for kind in ("tasks", "groups"):
        for name, entry in summary.get(kind, {}).items():
            metrics = entry.get("metrics", {})
            n = entry.get("samples", {}) if kind == "tasks" else {}
            count = f"{n.get('evaluated')}/{n.get('total')}" if n else "group"
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if metric.endswith("_stderr"):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}" if filt else f"{metric}_stderr")
                label = metric if filt in ("", "none") else f"{metric} ({filt})"
                out.append((name, label, value, stderr, count))
    return out
