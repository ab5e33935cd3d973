"""The proxy: the pruned model's loss on a few held-out calibration windows, cheap enough for every decision.

Every allocation (a run, a what-if, a diagnosis fix, a `prune tune` trial) is scored by it before
anything is cut: the removed groups are masked (their inputs to o_proj / down_proj are zeroed by
forward pre-hooks, which equals removing them without compensation), and the mean next-token loss of
the held-out windows is measured with a handful of forward passes. The windows are drawn with the
calibration windows but never seen by the importance pass (`[data] proxy_samples`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prune_core.adapters import Adapter


def _column_masks(adapter: Adapter, model: nn.Module, pruned: Mapping[int, Mapping[str, Sequence[int]]]
                  ) -> dict[tuple[int, str], torch.Tensor]:
    masks: dict[tuple[int, str], torch.Tensor] = {}
    for layer, spec in pruned.items():
        parts = adapter.parts(model, int(layer))
        att = list(spec.get("attention", ()))
        mlp = list(spec.get("mlp", ()))
        if att:
            width = parts.head_dim * parts.group_size
            mask = torch.ones(parts.o_proj.in_features, dtype=parts.o_proj.weight.dtype,
                              device=parts.o_proj.weight.device)
            for k in att:
                mask[k * width:(k + 1) * width] = 0
            masks[(int(layer), "o_proj")] = mask
        if mlp:
            mask = torch.ones(parts.down_proj.in_features, dtype=parts.down_proj.weight.dtype,
                              device=parts.down_proj.weight.device)
            mask[torch.as_tensor(mlp, dtype=torch.long, device=mask.device)] = 0
            masks[(int(layer), "down_proj")] = mask
    return masks


@contextmanager
def masked(model: nn.Module, adapter: Adapter, pruned: Mapping[int, Mapping[str, Sequence[int]]]) -> Any:
    """Within the block, `model` behaves as if the `pruned` groups were removed (no compensation)."""
    handles = []
    try:
        for (layer, name), mask in _column_masks(adapter, model, pruned).items():
            module = getattr(adapter.parts(model, layer), name)

            def hook(_module: nn.Module, args: tuple[Any, ...], mask: torch.Tensor = mask) -> tuple[Any, ...]:
                return (args[0] * mask, *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mean_loss(model: nn.Module, tokens: torch.Tensor, *, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy of `tokens` [N, T] (every predicted token weighs the same)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        ids = tokens[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return total / max(count, 1)


def proxy_loss(model: nn.Module, adapter: Adapter, tokens: torch.Tensor,
               pruned: Mapping[int, Mapping[str, Sequence[int]]] | None, *, batch_size: int = 4) -> float:
    """The proxy of one allocation: mean loss of the held-out windows with `pruned` masked out."""
    was_training = model.training
    model.eval()
    try:
        with masked(model, adapter, pruned or {}):
            loss = mean_loss(model, tokens, batch_size=batch_size)
    finally:
        model.train(was_training)
    return loss if math.isfinite(loss) else float("inf")
