"""Find where a NaN/Inf comes from, so a failed batch can name the layer and module.

Only runs after a failure (cost does not matter): first looks for a non-finite parameter, then
re-runs the batch's forward pass with forward hooks on every module and reports the first module
(in execution order) whose output holds NaN/Inf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _first_tensor(output: object) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "logits", None)


def locate_nonfinite(model: nn.Module, input_ids: torch.Tensor) -> str | None:
    """Name of the first parameter or module output holding NaN/Inf for this batch, or None."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not bool(torch.isfinite(p).all()):
                return f"parameter {name}"
        found: list[str] = []
        handles = []

        def make(name: str) -> Callable[[nn.Module, tuple, object], None]:
            def hook(module: nn.Module, args: tuple, output: object) -> None:
                t = _first_tensor(output)
                if (
                    not found
                    and t is not None
                    and t.is_floating_point()
                    and not bool(torch.isfinite(t).all())
                ):
                    found.append(name)

            return hook

        for name, module in model.named_modules():
            if name and not any(True for _ in module.children()):
                handles.append(module.register_forward_hook(make(name)))
        try:
            model(input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return f"output of {found[0]}" if found else None
