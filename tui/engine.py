"""The TUI's one door into the engine: every `prune_core` call the workbench UI makes goes through here.

Imports are lazy so the app starts quickly and the screens stay testable; nothing here computes
anything the engine already does — it only gathers facts for display (model geometry, a text preview).
All functions may be slow (loading a model, reading a corpus): call them from worker threads.
"""

from __future__ import annotations

import time
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


def inspect_model(session: Session) -> ModelInfo:
    """Resolve the session's model (may download or convert) and read its geometry."""
    from prune_core.adapters import get_adapter
    from prune_core.models import resolve_model

    m = session.model
    loaded = resolve_model(m.id, revision=m.revision, dtype=m.dtype, device=m.device,
                           trust_remote_code=m.trust_remote_code)
    facts = get_adapter(loaded.model).describe(loaded.model)
    device = str(next(loaded.model.parameters()).device)
    info = ModelInfo(spec=m.id, source=str(loaded.source), device=device, tokenizer=loaded.tokenizer,
                     **{k: v for k, v in facts.items() if k in ModelInfo.__dataclass_fields__})
    del loaded
    return info


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


def new_workbench(session: Session, results_dir: Path | None, *, on_event: EventSink,
                  should_stop: Any, fresh: bool = False) -> Any:
    """A `prune_core.workbench.Workbench` for the session (results in `results_dir_for` by default)."""
    from prune_core.workbench import Workbench, results_dir_for

    folder = results_dir or results_dir_for(session)
    return Workbench(session, folder, on_event=on_event, should_stop=should_stop, fresh=fresh)


def results_dir_for(session: Session) -> Path:
    from prune_core.workbench import results_dir_for as _rd

    return Path(_rd(session))


def open_results(path: Path) -> Any:
    """Read a results folder without recomputing (`prune_core.results.open_results`)."""
    try:
        from prune_core.workbench import open_results as _open  # type: ignore[attr-defined]
    except ImportError:
        from prune_core.results import open_results as _open

    return _open(path)


def stats_from_statistics(doc: dict[str, Any]) -> tuple[dict[str, dict[str, list[float]]], str]:
    """Per-layer statistics (block -> stat -> [L]) from a results folder's gradient_statistics.json."""
    from prune_core.diagnosis import stats_from_statistics as _convert

    return _convert(doc)


def is_results_folder(path: Path) -> bool:
    return path.is_dir() and (path / "session.toml").is_file()
