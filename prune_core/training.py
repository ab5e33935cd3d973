"""The pieces of an optimizer loop that both trainings share: `prune recover`'s LoRA fine-tuning
(recovery.py) and the distill stage (compensation/distill.py).

Why one place: the learning-rate schedule (linear warm-up over 5 % of the steps, then cosine to
lr/10) and the step itself (refuse a non-finite loss with the caller's fix before anything changes,
then backward, step, clear) are the same rule in both; the README documents it once.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from prune_core.errors import RunFailed

WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1


class Schedule(Protocol):
    """What the learning-rate schedule reads off a training's settings (recovery's and distill's)."""

    @property
    def steps(self) -> int: ...
    @property
    def lr(self) -> float: ...


def lr_at(step: int, settings: Schedule) -> float:
    """The learning rate of 0-based `step`: linear warm-up over 5 % of the steps, then cosine to lr/10."""
    warmup = max(1, round(settings.steps * WARMUP_FRACTION)) if settings.steps >= 20 else 0
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    span = max(1, settings.steps - warmup)
    progress = (step - warmup) / span
    floor = settings.lr * FINAL_LR_FRACTION
    return floor + (settings.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, what: str, fix: str) -> float:
    """Backward, step and clear the gradients; the loss as a float. A non-finite loss raises RunFailed
    ("`what` is nan", `fix`) before anything changes."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise RunFailed(f"{what} is {value}", fix)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return value
