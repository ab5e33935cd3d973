"""Put a model in the state the importance pass needs, and put it back afterwards.

- eval mode (no dropout) — every module's `training` flag is restored exactly afterwards;
- for gradient passes, requires_grad only on the scored parameters (prunable weights and q/k/v/
  gate/up biases): embeddings, norms and lm_head get no gradient, which saves their backward work
  and memory (with tied embeddings that is the whole lm_head weight gradient);
- optional gradient (activation) checkpointing: transformers only checkpoints a decoder layer
  whose own `training` flag is set, so that flag alone is switched on — the attention modules stay
  in eval mode, so dropout stays off.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


def _checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _set_checkpointing(model: nn.Module, enable: bool) -> None:
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


@contextmanager
def prepared(
    model: nn.Module,
    *,
    grad_params: Sequence[nn.Parameter] | None,
    layers: Sequence[nn.Module],
    gradient_checkpointing: bool = False,
) -> Iterator[None]:
    """Eval mode; requires_grad only on `grad_params` (None: leave flags alone); optional checkpointing."""
    training = {m: m.training for m in model.modules()}
    requires = {p: p.requires_grad for p in model.parameters()}
    enabled_checkpointing = False
    try:
        model.eval()
        if grad_params is not None:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in grad_params:
                p.requires_grad_(True)
        if gradient_checkpointing:
            if not _checkpointing_on(model):
                _set_checkpointing(model, True)
                enabled_checkpointing = True
            for layer in layers:
                layer.training = True  # the layer only: its submodules (dropout) stay in eval mode
        yield
    finally:
        if enabled_checkpointing:
            _set_checkpointing(model, False)
        for m, flag in training.items():
            m.training = flag
        for p, flag in requires.items():
            p.requires_grad_(flag)
