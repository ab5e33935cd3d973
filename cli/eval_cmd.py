"""`prune eval MODEL_DIR` (perplexity): the run's own [evaluation] settings and the progress it shows."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

from prune_core.events import Event, EventSink, StagePlan, StageStarted

STAGE = "perplexity"  # what the pipeline's `eval_before` stage measures here: the saved pruned model
PIPELINE_STAGE = "eval_before"


class EvalSettings(NamedTuple):
    dataset: str
    seq_len: int
    max_tokens: int


def recorded_evaluation(model_dir: Path, info: dict[str, Any], in_results: bool) -> dict[str, Any]:
    """The [evaluation] settings of the run the model comes from (dataset, seq_len, max_tokens; those found):
    its results folder's session.toml when the model sits in one, else the session recorded in pruning.json."""
    saved: Any = info.get("session")
    if in_results:
        from sessions import load_with_extras

        # BadInput (exit 2) naming the file when it is damaged
        saved = load_with_extras(model_dir.resolve().parent / "session.toml")[0].model_dump(mode="json")
    if not isinstance(saved, dict):
        return {}
    evaluation, data = (v if isinstance(v, dict) else {} for v in (saved.get("evaluation"), saved.get("data")))
    found: dict[str, Any] = {}
    dataset = evaluation.get("dataset") or data.get("dataset")  # an empty evaluation.dataset means [data]'s
    if isinstance(dataset, str) and dataset:
        found["dataset"] = dataset
    for key in ("seq_len", "max_tokens"):
        value = evaluation.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
    return found


def eval_settings(recorded: dict[str, Any], *, dataset: str | None, seq_len: int | None,
                  max_tokens: int | None) -> EvalSettings:
    """The options given on the command line, else the run's settings, else the schema's defaults."""
    from sessions.schema import EvaluationSection

    default = EvaluationSection()
    return EvalSettings(
        dataset=dataset or recorded.get("dataset") or "shakespeare",
        seq_len=seq_len if seq_len is not None else recorded.get("seq_len", default.seq_len),
        max_tokens=max_tokens if max_tokens is not None else recorded.get("max_tokens", default.max_tokens),
    )


def relabeled(sink: EventSink, description: str) -> EventSink:
    """Pass events on to `sink` with the `eval_before` stage shown as `perplexity` (`description` when it
    starts): `prune eval` measures the saved pruned model, not a model before pruning."""

    def name(stage: str) -> str:
        return STAGE if stage == PIPELINE_STAGE else stage

    def forward(event: Event) -> None:
        if isinstance(event, StagePlan):
            event = dataclasses.replace(event, recompute=tuple(map(name, event.recompute)),
                                        reused=tuple(map(name, event.reused)),
                                        estimates={name(k): v for k, v in event.estimates.items()})
        elif getattr(event, "stage", None) == PIPELINE_STAGE:
            changes: dict[str, Any] = {"stage": STAGE}
            if isinstance(event, StageStarted):
                changes["description"] = description
            event = dataclasses.replace(event, **changes)  # type: ignore[type-var]
        sink(event)

    return forward
