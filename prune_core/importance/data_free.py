"""Importance of a method that reads only the weights (magnitude): no batches, no checkpoint.

Why apart from engine.py: the data pass (batches, hooks, checkpoints, ranks) has nothing to do here;
this builds the same ImportanceResult from the method's scores of the weights, with zero input sums
(bias compensation then adds nothing) and the statistics the method takes of the weights.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from prune_core.adapters.base import Adapter
from prune_core.events import EventSink, StageDone, StageStarted
from prune_core.importance.groups import pad_rows, prunable_targets, targets_digest
from prune_core.importance.hooks import INPUT_SUM_KEYS
from prune_core.importance.methods.spec import MethodSpec, ScoreInputs
from prune_core.importance.result import ENGINE_VERSION, ImportanceResult


def data_free_importance(
    model: nn.Module,
    adapter: Adapter,
    spec: MethodSpec,
    aggregation: str,
    fisher_scale: str,
    identity: dict[str, Any],
    emit: EventSink,
    stage: str,
) -> ImportanceResult:
    """A method that reads only the weights: no batches, no checkpoint, statistics from the weights."""
    started = time.perf_counter()
    emit(StageStarted(stage, f"{spec.key} importance: weights only, no calibration data", 0))
    parts = adapter.all_parts(model)
    targets = prunable_targets(parts)
    with torch.no_grad():
        scored = spec.score(ScoreInputs(parts=parts, targets=targets, aggregation=aggregation))
    layout, sample = targets_digest(targets)
    sums = {
        key: pad_rows(
            [
                torch.zeros(p.linear(p.layout.block(block).output).in_features, dtype=torch.float64)
                if p.layout.block(block).groups
                else torch.zeros(0, dtype=torch.float64)
                for p in parts
            ]
        )
        for block, key in INPUT_SUM_KEYS.items()
    }
    seconds = time.perf_counter() - started
    metadata = {
        "engine_version": ENGINE_VERSION,
        "identity": {
            "engine": {
                "version": ENGINE_VERSION,
                "method": spec.key,
                "parameters_sha256": layout,
                "weights_sample_sha256": sample,
            },
            "caller": identity,
        },
        "dtype": str(targets[0].param.dtype).removeprefix("torch."),
        "device": str(targets[0].param.device),
        "mean_loss": None,
        "num_layers": len(parts),
        "attention_groups": [p.num_kv_heads for p in parts],
        "mlp_groups": [p.intermediate_size for p in parts],
        "num_heads": [p.num_heads for p in parts],
        "head_dim": [p.head_dim for p in parts],
    }
    result = ImportanceResult(
        method=spec.key,
        aggregation=aggregation,
        fisher_scale=fisher_scale,
        attention=scored.scores.attention,
        mlp=scored.scores.mlp,
        first_order=None,
        stats=scored.stats or {},
        stats_label=spec.stats_label,
        batch_stats=[],
        input_sums=sums,
        input_tokens=0,
        batches=0,
        tokens=0,
        seconds=seconds,
        metadata=metadata,
    )
    emit(StageDone(stage, seconds, summary=f"{spec.key}: {len(targets)} weight tensors, no data"))
    return result
