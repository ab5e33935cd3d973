"""Gradient accumulation for the taylor / taylor_2nd pass: Σ_b g_b, Σ_b n_b·g_b², per-batch stats.

Definitions (b = batch, B = batches, g_b = ∇ loss_b computed fresh, n_b = fisher weight of batch b):

    mean gradient  ḡ = (1/B) Σ_b g_b                 -> `mean_grad(key)`
    Fisher diag    F = (1/B) Σ_b n_b · g_b²           -> `fisher(key)`   (taylor_2nd only)

n_b = tokens predicted in batch b (rows × (seq_len − 1)) for fisher_scale="tokens", 1 for "none"; the
caller passes it as `weight`. F is the mean of the per-batch *squared* gradients — never the square of
the accumulated gradient (that was the seed bug: it makes the second-order term a function of ḡ).

Both sums are plain sums in float32 buffers (float64 for float64 models), so a data-parallel
all-reduce can be added later; division by B happens only when reading.

How it stays cheap: a post-accumulate-grad hook runs on each parameter right after autograd writes
its gradient, while that gradient is still in cache. The hook writes 5 reductions (stats.fill_row)
into a per-batch buffer and, in *streaming* mode (CPU), checks the gradient is finite and adds it
into the sums in place (add_ / addcmul_), so no pass over the gradients is needed after backward.
On accelerators a finiteness check per parameter would synchronise the device, so *deferred* mode
keeps the gradients, checks all rows with one transfer after backward, then adds.

A non-finite gradient never reaches the sums in deferred mode; in streaming mode the parameters
already added for the failing batch are subtracted back out (exact up to float rounding), so the
state after a failure is the state before that batch. `NonFiniteGradient` names the parameter.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import nn

from prune_core.importance.stats import ROW_WIDTH, SUM_SQ, fill_row


class NonFiniteGradient(Exception):
    """A batch produced a NaN/Inf gradient; the sums were left as they were before the batch."""

    def __init__(self, key: str) -> None:
        super().__init__(f"non-finite gradient in {key}")
        self.key = key


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/bf16/fp16 parameters, float64 for float64 ones."""
    return torch.promote_types(dtype, torch.float32)


class GradientAccumulator:
    """Accumulates Σg (and Σ n·g² when `second_order`) over batches for named parameters.

    Use as a context manager (attaches / removes the hooks), then call `accumulate(loss, weight)`
    once per batch. Gradients of other parameters are not touched; callers set requires_grad.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, nn.Parameter]],
        *,
        second_order: bool,
        hessian_device: torch.device | str | None = None,
        streaming: bool | None = None,
    ) -> None:
        if not named_params:
            raise ValueError("no parameters to accumulate")
        self.keys = [k for k, _ in named_params]
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.params = [p for _, p in named_params]
        self.device = self.params[0].device
        self.dtype = accumulation_dtype(self.params[0].dtype)
        self.second_order = second_order
        self.hessian_device = torch.device(hessian_device) if hessian_device is not None else self.device
        self.streaming = (self.device.type == "cpu") if streaming is None else streaming
        # memory-bound reductions gain nothing from a second CPU thread, and on a busy machine every
        # parallel region waits for its slowest thread: the hook's work runs on one thread
        self.single_thread = self.device.type == "cpu"
        self.sum_grad = [torch.zeros(p.shape, dtype=self.dtype, device=self.device) for p in self.params]
        self.sum_sq = (
            [torch.zeros(p.shape, dtype=self.dtype, device=self.hessian_device) for p in self.params]
            if second_order
            else None
        )
        self.batches = 0
        self.counts = [p.numel() for p in self.params]
        self._rows = torch.zeros(len(self.params), ROW_WIDTH, dtype=self.dtype, device=self.device)
        self._scratch = torch.empty(max(self.counts), dtype=self.dtype, device=self.device)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fired = [0] * len(self.params)
        self._added = [False] * len(self.params)
        self._bad: str | None = None
        self._reused: str | None = None
        self._weight = 1.0

    # hooks -------------------------------------------------------------------------------------
    def __enter__(self) -> GradientAccumulator:
        self.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def attach(self) -> None:
        if not self._handles:
            self._handles = [
                p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, i))
                for i, p in enumerate(self.params)
            ]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in self.params:
            p.grad = None

    def _grad(self, i: int) -> torch.Tensor:
        g = self.params[i].grad
        assert g is not None
        return g if g.dtype == self.dtype else g.to(self.dtype)

    def _on_grad(self, i: int, param: nn.Parameter) -> None:
        self._fired[i] += 1
        if self._fired[i] > 1:
            self._reused = self._reused or self.keys[i]
            return
        threads = torch.get_num_threads() if self.single_thread else 1
        if threads > 1:
            torch.set_num_threads(1)
        try:
            self._process(i)
        finally:
            if threads > 1:
                torch.set_num_threads(threads)

    def _process(self, i: int) -> None:
        with torch.no_grad():
            g = self._grad(i)
            fill_row(g.reshape(-1), self._rows[i], self._scratch)
            if not self.streaming:
                return
            if self._bad is not None:
                return
            if not math.isfinite(float(self._rows[i, SUM_SQ])):
                self._bad = self.keys[i]
                return
            self._add(i, g, 1.0)
            self._added[i] = True

    def _add(self, i: int, g: torch.Tensor, sign: float) -> None:
        self.sum_grad[i].add_(g, alpha=sign)
        if self.sum_sq is not None:
            gh = g if self.hessian_device == self.device else g.to(self.hessian_device)
            self.sum_sq[i].addcmul_(gh, gh, value=sign * self._weight)

    # one batch ---------------------------------------------------------------------------------
    def accumulate(self, loss: torch.Tensor, weight: float = 1.0) -> list[list[float]]:
        """Backward `loss` with fresh gradients and add them in; returns the per-parameter stat rows.

        Raises NonFiniteGradient (sums unchanged) when any gradient holds NaN/Inf.
        """
        if not self._handles:
            raise RuntimeError("GradientAccumulator.accumulate needs attach() (or a with block) first")
        for p in self.params:
            p.grad = None
        self._rows.zero_()
        self._fired = [0] * len(self.params)
        self._added = [False] * len(self.params)
        self._bad = None
        self._reused = None
        self._weight = float(weight)
        try:
            loss.backward()
            if self._reused is not None:
                raise RuntimeError(
                    f"{self._reused} received two gradients in one backward pass (a weight used twice?); "
                    "the importance engine needs every prunable linear to run once per forward"
                )
            rows = self._rows.tolist()
            if self._bad is None and not self.streaming:
                bad = [i for i, r in enumerate(rows) if not math.isfinite(r[SUM_SQ])]
                if bad:
                    self._bad = self.keys[bad[-1]]  # the latest layer: where backward met it first
                else:
                    with torch.no_grad():
                        for i, p in enumerate(self.params):
                            if p.grad is not None:
                                self._add(i, self._grad(i), 1.0)
            if self._bad is not None:
                with torch.no_grad():
                    for i, added in enumerate(self._added):
                        if added:
                            self._add(i, self._grad(i), -1.0)
                raise NonFiniteGradient(self._bad)
        finally:
            for p in self.params:
                p.grad = None
        self.batches += 1
        return [r if self._fired[i] else [0.0] * ROW_WIDTH for i, r in enumerate(rows)]

    # reading -----------------------------------------------------------------------------------
    def index(self, key: str) -> int:
        return self._index[key]

    def mean_grad(self, key: str) -> torch.Tensor:
        """ḡ = Σ_b g_b / B."""
        return self.sum_grad[self.index(key)] / max(self.batches, 1)

    def fisher(self, key: str) -> torch.Tensor:
        """F = Σ_b n_b·g_b² / B (second_order only)."""
        if self.sum_sq is None:
            raise ValueError("fisher() needs second_order=True")
        return self.sum_sq[self.index(key)] / max(self.batches, 1)

    def nbytes(self) -> int:
        sums = self.sum_grad + (self.sum_sq or [])
        return sum(t.numel() * t.element_size() for t in sums)

    # checkpointing -----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"grad_sum.{k}": t for k, t in zip(self.keys, self.sum_grad, strict=True)}
        if self.sum_sq is not None:
            out.update({f"grad_sq.{k}": t for k, t in zip(self.keys, self.sum_sq, strict=True)})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], batches: int) -> None:
        with torch.no_grad():
            for name, dst in self.state_tensors().items():
                src = tensors[name]
                if src.shape != dst.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != {tuple(dst.shape)}")
                dst.copy_(src)
        self.batches = batches
