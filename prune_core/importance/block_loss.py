"""Block / layer importance: how much the calibration loss rises when one block is removed.

For every decoder layer l, three forward-only (no_grad) passes over the given windows:
- attention: the self-attention output is replaced by zeros (the residual stream is kept, so the
  layer computes h + 0 + mlp(...));
- mlp: the MLP output is replaced by zeros;
- layer: the whole decoder layer is skipped (its output = its input hidden states).
Each is implemented with a forward hook that replaces the module's output (the attention module
returns a tuple: element 0 becomes zeros; the decoder layer returns a tensor in transformers 5, a
tuple in older versions). The loss of a pass is the token-weighted mean of the per-batch losses
model(ids, labels=ids).loss; the importance is loss(variant) − base loss (it can be negative).
The allocation uses these to correct per-group importance across depth.

With several ranks (prune_core/distributed.py) every pass splits its windows' batches: batch i is read
by rank i % world, each rank sums loss·tokens and tokens over its batches, and one all-reduce (SUM,
float64) gives the totals, so every rank gets the same losses (equal to one process's up to the
order of the float64 additions). A stop asked on any rank stops all (all-reduce MAX); only rank 0
reports progress.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prune_core import distributed
from prune_core.adapters.base import Adapter
from prune_core.errors import BadInput, Interrupted, RunFailed
from prune_core.events import EventSink, Progress, StageDone, StageStarted, null_sink
from prune_core.importance.engine import batch_slices
from prune_core.importance.prepare import prepared

KINDS = ("attention", "mlp", "layer")


@dataclass
class BlockImportance:
    base_loss: float
    attention: list[float]  # [L] loss increase when layer l's attention output is zeroed (residual kept)
    mlp: list[float]  # [L] same for the MLP
    layer: list[float]  # [L] same with the whole decoder layer skipped

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockImportance:
        return cls(
            base_loss=float(d["base_loss"]),
            attention=[float(x) for x in d["attention"]],
            mlp=[float(x) for x in d["mlp"]],
            layer=[float(x) for x in d["layer"]],
        )


def _zero_attention(module: nn.Module, args: tuple, output: Any) -> Any:
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


def _zero_output(module: nn.Module, args: tuple, output: Any) -> Any:
    return torch.zeros_like(output)


def _skip_layer(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


@contextmanager
def ablated(model: nn.Module, adapter: Adapter, layer: int, kind: str) -> Iterator[None]:
    """Within the block, layer `layer`'s `kind` ("attention" | "mlp" | "layer") is removed."""
    parts = adapter.parts(model, layer)
    if kind == "attention":
        handle = parts.attn.register_forward_hook(_zero_attention)
    elif kind == "mlp":
        handle = parts.mlp.register_forward_hook(_zero_output)
    elif kind == "layer":
        handle = parts.layer.register_forward_hook(_skip_layer, with_kwargs=True)
    else:
        raise ValueError(f"unknown block kind {kind!r}")
    try:
        yield
    finally:
        handle.remove()


def mean_loss(model: nn.Module, tokens: torch.Tensor, batch_size: int,
              world: distributed.World | None = None) -> float:
    """Token-weighted mean next-token loss over the windows (forward only). With `world` (a collective
    call on every rank) each rank reads its share of the batches and the sums are all-reduced."""
    device = next(model.parameters()).device
    w = world or distributed.World()
    total, count = 0.0, 0
    with torch.no_grad():
        for i, (lo, hi) in enumerate(batch_slices(int(tokens.shape[0]), batch_size)):
            if w.active and not w.owns(i):
                continue
            ids = tokens[lo:hi].to(device=device, dtype=torch.long)
            n = (hi - lo) * (int(tokens.shape[1]) - 1)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * n
            count += n
    if w.active:
        total, count = w.sum_numbers([total, count])
    return total / count


def block_importance(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.LongTensor,
    *,
    batch_size: int,
    on_event: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
    stage: str = "block_importance",
) -> BlockImportance:
    """Base loss, then the loss increase for each layer's attention, MLP and whole layer removed.

    should_stop() is polled after every pass; when true, raises errors.Interrupted (nothing is kept:
    a full run is 1 + 3·L forward passes over the windows).
    """
    emit: EventSink = on_event or (lambda event: None)
    w = distributed.world()
    if not w.is_main:
        emit = null_sink
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise BadInput(
            f"block importance needs token windows [n, seq_len >= 2] (got {tuple(tokens.shape)})",
            "pass the calibration windows",
        )
    if batch_size < 1:
        raise BadInput(f"batch_size must be at least 1 (got {batch_size})", "set batch_size >= 1")
    num_layers = adapter.num_layers(model)
    steps = 1 + len(KINDS) * num_layers
    emit(
        StageStarted(stage, f"block importance: {steps} forward passes over {tokens.shape[0]} windows", steps)
    )
    started = time.perf_counter()
    out: dict[str, list[float]] = {k: [] for k in KINDS}

    def check(done: int, message: str) -> None:
        emit(Progress(stage, done, steps, "passes", message))
        asked = should_stop is not None and done < steps and bool(should_stop())
        if w.active:
            (asked,) = w.any_of(asked) if done < steps else (False,)
        if asked:
            raise Interrupted(
                f"block importance stopped after {done}/{steps} passes",
                "run again to recompute it (it keeps no partial state)",
            )

    with prepared(model, grad_params=None, layers=list(adapter.layers(model))):
        base = mean_loss(model, tokens, batch_size, w)
        if not math.isfinite(base):
            raise RunFailed(
                f"the base loss of block importance is {base}",
                "load the model in float32 or check its weights for NaN/Inf",
            )
        check(1, f"base loss {base:.4f}")
        done = 1
        for layer in range(num_layers):
            for kind in KINDS:
                with ablated(model, adapter, layer, kind):
                    loss = mean_loss(model, tokens, batch_size, w)
                out[kind].append(loss - base)
                done += 1
                check(done, f"layer {layer} {kind}: {loss - base:+.4f}")
    result = BlockImportance(base_loss=base, attention=out["attention"], mlp=out["mlp"], layer=out["layer"])
    emit(StageDone(stage, time.perf_counter() - started, summary=f"base loss {base:.4f}"))
    return result
