"""The TUI's one door into the engine: every `prune_core` call the workbench UI makes goes through here.

`Pipeline` wraps `prune_core.pipeline.run` and `RunReport.read` (the app's jobs call nothing else);
the rest gathers facts for display (built-in lists, a text preview, the machine's speed). Imports
are lazy so the app starts quickly and the screens stay testable. Nothing here loads a model: the
Model step's facts come from the pipeline's own "model" stage value (`model_info`).
All functions may be slow (reading a corpus, a pipeline stage): call them from worker threads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_core.events import EventSink
from sessions import Session


@dataclass
class ModelInfo:
    """Facts about a resolved model, shown by the Model step and used by the estimate."""

    spec: str
    source: str = ""
    family: str = ""
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    prunable_parameters: int = 0
    total_parameters: int = 0
    device: str = "cpu"
    tokenizer: Any = field(default=None, repr=False, compare=False)


def builtin_models() -> list[dict[str, Any]]:
    """Built-in model keys with description, parameters, cached flag (see `prune models`)."""
    from prune_core.models import builtin_models as _builtin

    return list(_builtin())


def dataset_names() -> list[dict[str, Any]]:
    """Built-in dataset keys with description and availability."""
    from prune_core.data import dataset_names as _names

    return list(_names())


def model_info(spec: str, model_value: Any) -> ModelInfo:
    """The Model step's facts, read off the pipeline's loaded model (`steps.ModelValue`): no second load."""
    facts = dict(getattr(model_value, "facts", {}) or {})
    model = model_value.model
    device = str(next(model.parameters()).device)
    return ModelInfo(spec=spec, source=str(model_value.loaded.source), device=device,
                     tokenizer=model_value.tokenizer,
                     **{k: v for k, v in facts.items() if k in ModelInfo.__dataclass_fields__})


def preview_text(dataset: str, chars: int = 1200) -> tuple[str, int]:
    """The start of the calibration text and its length in characters."""
    from prune_core.data import load_text

    text = load_text(dataset, "calibration")
    return text[:chars], len(text)


def count_tokens(tokenizer: Any, dataset: str, limit_chars: int = 2_000_000) -> tuple[int, bool]:
    """Tokens in the calibration text (counted on at most `limit_chars`, extrapolated beyond)."""
    from prune_core.data import load_text

    text = load_text(dataset, "calibration")
    part = text[:limit_chars]
    n = len(tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"])
    if len(text) > len(part) and part:
        return int(n * len(text) / len(part)), True
    return n, False


def cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def measure_cpu_flops(seconds: float = 0.2) -> float:
    """A rough float32 matmul throughput of this machine (FLOP/s), for the time estimate."""
    import torch

    n = 384
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    elapsed = time.perf_counter() - start
    return 2.0 * n ** 3 * count / max(elapsed, 1e-9)


class Pipeline:
    """The workbench's door into `prune_core.pipeline` and `prune_core.report` (tests pass a fake).

    Every engine job of the app is one of these calls, made on the app's engine worker thread.
    """

    def new_memo(self) -> Any:
        """A `pipeline.Memo`: stage values kept between runs of this process (what-ifs reuse them)."""
        from prune_core.pipeline import Memo

        return Memo()

    def run(self, session: Session, *, out_dir: Path | None = None, until: str | None = None, memo: Any = None,
            fresh: bool = False, write: bool = True, on_event: EventSink | None = None,
            should_stop: Callable[[], bool] | None = None) -> Any:
        """`pipeline.run`: the declared stages up to `until`; returns a `RunReport`."""
        from prune_core import pipeline
        from prune_core.events import null_sink

        return pipeline.run(session, out_dir=out_dir, until=until, memo=memo, fresh=fresh, write=write,
                            on_event=on_event or null_sink, should_stop=should_stop)

    def read(self, folder: Path) -> Any:
        """`RunReport.read`: a finished run's results, nothing recomputed."""
        from prune_core.report import RunReport

        return RunReport.read(folder)

    def has_checkpoint(self, session: Session, out_dir: Path | None = None) -> bool:
        from prune_core import pipeline

        return pipeline.has_checkpoint(pipeline.results_dir_for(session, out_dir))

    def results_dir_for(self, session: Session, out_dir: Path | None = None) -> Path:
        from prune_core import pipeline

        return Path(pipeline.results_dir_for(session, out_dir))

    def loaded(self, memo: Any, stage: str) -> Any:
        """The newest value of `stage` in the memo (the loaded model, the pruned copy), or None."""
        return memo.latest(stage) if memo is not None else None

    def generate(self, model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 40) -> str:
        """A short greedy continuation of `prompt` (the new text only)."""
        import torch

        device = next(model.parameters()).device
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=getattr(tokenizer, "eos_token_id", None))
        return str(tokenizer.decode(out[0][ids.shape[1]:], skip_special_tokens=True))


def run_holder(path: Path) -> Any:
    """The live process writing into results folder `path` (`prune_core.lock.LockInfo`), or None."""
    from prune_core.lock import holder

    return holder(Path(path))


def recorded_session_file(path: Path) -> str:
    """The session file the lock of results folder `path` records (live holder or not), or ""."""
    from prune_core.lock import read_info

    info = read_info(Path(path))
    return info.session_file if info is not None else ""


def is_results_folder(path: Path) -> bool:
    """A folder a finished run wrote (`prune_core.report.is_results_folder`)."""
    from prune_core.report import is_results_folder as _is

    return _is(path)


def run_log_summary(path: Path, max_bytes: int = 1 << 20) -> Any:
    """Where the run that wrote into `path` stands by its log (`prune_core.eventlog.LogSummary`), read from the
    last `max_bytes` of `events.ndjson` so that a long run's log is read quickly."""
    from prune_core.eventlog import log_path, read_lines, summarize

    try:
        size = log_path(Path(path)).stat().st_size
        tail = read_lines(Path(path), max(0, size - max_bytes))[0]  # a cut first line does not parse
    except OSError:
        tail = []
    return summarize(list(tail))


def folder_has_checkpoint(path: Path) -> bool:
    """An interrupted importance pass of results folder `path` can be resumed (`pipeline.has_checkpoint`)."""
    from prune_core.pipeline import has_checkpoint

    return bool(has_checkpoint(Path(path)))
