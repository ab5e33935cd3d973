"""Weight gradients delivered to a sink instead of `.grad`: Σg summed inside the backward GEMM.

The taylor pass needs Σ_b g_b for every prunable weight, where g_b = gyᵀ·x is the weight gradient of
batch b (gy: the gradient of the linear's output, x: its input, both [tokens, features]). Letting
autograd write g_b into `.grad` and then adding it into Σg reads and writes the whole weight twice
more per batch — on a CPU, where the pass is bound by memory bandwidth, that alone was ~6 % of the
bare forward+backward. Here the linear's forward is swapped (for the pass only) for one autograd
function whose backward computes the input gradient as usual and hands (gy, x) to a sink, which
folds them into the sums with one `addmm_` (Σg += gyᵀ·x) — the GEMM autograd runs anyway, now
writing into Σg instead of a fresh tensor — or materialises g where it needs it (Σ n·g² of
taylor_2nd). The weight itself gets no `.grad`.

Only plain `torch.nn.Linear` modules whose `forward` nobody else replaced (accelerate's device hooks,
quantised layers) are swapped; the swap is undone on exit. Forward hooks and pre-hooks still run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn import functional

# sink(gy, x, probe): gy [tokens, out_features] and x [tokens, in_features] of one backward of the
# linear; probe: a small tensor whose sum is finite if and only if gy is (see _SunkLinear.backward)
Sink = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


class _SunkLinear(torch.autograd.Function):
    """y = x·Wᵀ + b; backward returns the input and bias gradients and gives W's to the sink."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                sink: Sink) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.sink = sink
        ctx.has_bias = bias is not None
        return functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        gx = gy.matmul(weight) if ctx.needs_input_grad[0] else None
        gy2 = gy.reshape(-1, gy.shape[-1])
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[1]:
            # gx[t, 0] = Σ_c gy[t, c]·W[c, 0]: a NaN in row t of gy makes it NaN, an Inf makes it ±Inf
            # (or NaN where W[c, 0] = 0), so the first column of gx (one value per token, already in
            # cache) is non-finite exactly when gy is — or when gx itself overflowed, which is a
            # failing batch too. Without gx (the first layer) the probe is gy itself.
            probe = gx[..., 0] if gx is not None else gy2
            ctx.sink(gy2, x.reshape(-1, x.shape[-1]), probe)
        return gx, None, gb, None


def can_sink(module: nn.Module) -> bool:
    """A plain nn.Linear whose forward is its class's (nobody wrapped it)."""
    return type(module) is nn.Linear and "forward" not in vars(module)


@contextmanager
def sunk_linears(sinks: Mapping[nn.Linear, Sink]) -> Iterator[None]:
    """Route the weight gradient of each linear to its sink while the block runs."""
    swapped: list[nn.Linear] = []
    try:
        for module, sink in sinks.items():
            if not can_sink(module):
                raise ValueError(f"{type(module).__name__} cannot take a gradient sink (not a plain, unwrapped Linear)")

            def forward(x: torch.Tensor, module: nn.Linear = module, sink: Sink = sink) -> torch.Tensor:
                return _SunkLinear.apply(x, module.weight, module.bias, sink)

            module.forward = forward  # type: ignore[method-assign]
            swapped.append(module)
        yield
    finally:
        for module in swapped:
            del module.forward
