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
The first batch's gradient tensor itself becomes the Σg buffer (no zero-filled buffer to fault in).
On accelerators a finiteness check per parameter would synchronise the device, so *deferred* mode
keeps the gradients, checks all rows with one transfer after backward, then adds.

A non-finite gradient never reaches the sums in deferred mode; in streaming mode the parameters
already added for the failing batch are subtracted back out (exact up to float rounding), so the
state after a failure is the state before that batch. `NonFiniteGradient` names the parameter.

`accumulate(..., finalize=f)` calls f(i, Σg_i, Σn·g²_i) for every parameter right after its last
addition — in the hook, while the sums are in cache — so the caller can compute the final scores
of the last batch without another pass over all the sums.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from prune_core.importance.stats import ROW_WIDTH, SUM_SQ, fill_row

Finalizer = Callable[[int, torch.Tensor, "torch.Tensor | None"], None]


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
        # allocated lazily by the first addition (see _add); read them through sums()/state_tensors()
        self._sum_grad: list[torch.Tensor | None] = [None] * len(self.params)
        self._sum_sq: list[torch.Tensor | None] = [None] * len(self.params)
        self.batches = 0
        self.counts = [p.numel() for p in self.params]
        self._rows = torch.zeros(len(self.params), ROW_WIDTH, dtype=self.dtype, device=self.device)
        self._scratch = torch.empty(max(self.counts), dtype=self.dtype, device=self.device)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fired = [0] * len(self.params)
        self._added = [False] * len(self.params)
        self._created = [False] * len(self.params)
        self._bad: str | None = None
        self._reused: str | None = None
        self._weight = 1.0
        self._finalize: Finalizer | None = None

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
        with torch.no_grad():
            g = self._grad(i)
            fill_row(g.reshape(-1), self._rows[i], self._scratch)
            if not self.streaming or self._bad is not None:
                return
            if not math.isfinite(float(self._rows[i, SUM_SQ])):
                self._bad = self.keys[i]
                return
            self._add(i, g, 1.0)
            if self._finalize is not None:
                self._finalize(i, self._sum_grad[i], self._sum_sq[i])  # type: ignore[arg-type]

    def _add(self, i: int, g: torch.Tensor, sign: float) -> None:
        """Σg += sign·g and Σn·g² += sign·n·g²; the first addition adopts g (and g²·n) as the buffers."""
        if sign < 0 and self._created[i]:
            self._sum_grad[i] = self._sum_sq[i] = None
            self._created[i] = False
            return
        gh = g if self.hessian_device == self.device else g.to(self.hessian_device)
        current = self._sum_grad[i]
        if current is None:
            self._created[i] = True
            # the gradient tensor is ours once p.grad is reset (end of the batch): adopt it
            self._sum_grad[i] = g if g.is_contiguous() else g.contiguous()
            if self.second_order:
                self._sum_sq[i] = torch.mul(gh, gh).mul_(self._weight)
        else:
            current.add_(g, alpha=sign)
            if self.second_order:
                sq = self._sum_sq[i]
                assert sq is not None
                sq.addcmul_(gh, gh, value=sign * self._weight)
        self._added[i] = sign > 0

    # one batch ---------------------------------------------------------------------------------
    def accumulate(
        self, loss: torch.Tensor, weight: float = 1.0, *, finalize: Finalizer | None = None
    ) -> list[list[float]]:
        """Backward `loss` with fresh gradients and add them in; returns the per-parameter stat rows.

        Raises NonFiniteGradient (sums unchanged) when any gradient holds NaN/Inf. `finalize`, if
        given, is called as finalize(i, Σg_i, Σn·g²_i or None) after parameter i's addition.
        """
        if not self._handles:
            raise RuntimeError("GradientAccumulator.accumulate needs attach() (or a with block) first")
        for p in self.params:
            p.grad = None
        self._rows.zero_()
        n = len(self.params)
        self._fired, self._added, self._created = [0] * n, [False] * n, [False] * n
        self._bad = self._reused = None
        self._weight = float(weight)
        self._finalize = finalize
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
                                if finalize is not None:
                                    finalize(i, self._sum_grad[i], self._sum_sq[i])  # type: ignore[arg-type]
            if self._bad is not None:
                with torch.no_grad():
                    for i, added in enumerate(self._added):
                        if added:
                            self._add(i, self._grad(i), -1.0)
                raise NonFiniteGradient(self._bad)
        finally:
            self._finalize = None
            for p in self.params:
                p.grad = None
        if finalize is not None:  # parameters that got no gradient this batch
            for i, fired in enumerate(self._fired):
                if not fired:
                    finalize(i, self.sum_grad(i), self.sum_sq(i) if self.second_order else None)
        self.batches += 1
        return [r if self._fired[i] else [0.0] * ROW_WIDTH for i, r in enumerate(rows)]

    # reading -----------------------------------------------------------------------------------
    def index(self, key: str) -> int:
        return self._index[key]

    def sum_grad(self, i: int) -> torch.Tensor:
        """Σ_b g_b of parameter i (materialised as zeros before the first batch)."""
        if self._sum_grad[i] is None:
            self._sum_grad[i] = torch.zeros(self.params[i].shape, dtype=self.dtype, device=self.device)
        return self._sum_grad[i]  # type: ignore[return-value]

    def sum_sq(self, i: int) -> torch.Tensor:
        """Σ_b n_b·g_b² of parameter i (second_order only)."""
        if not self.second_order:
            raise ValueError("sum_sq() needs second_order=True")
        if self._sum_sq[i] is None:
            self._sum_sq[i] = torch.zeros(self.params[i].shape, dtype=self.dtype, device=self.hessian_device)
        return self._sum_sq[i]  # type: ignore[return-value]

    def mean_grad(self, key: str) -> torch.Tensor:
        """ḡ = Σ_b g_b / B."""
        return self.sum_grad(self.index(key)) / max(self.batches, 1)

    def fisher(self, key: str) -> torch.Tensor:
        """F = Σ_b n_b·g_b² / B (second_order only)."""
        return self.sum_sq(self.index(key)) / max(self.batches, 1)

    def nbytes(self) -> int:
        per = self.dtype.itemsize * (2 if self.second_order else 1)
        return sum(self.counts) * per

    # checkpointing -----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"grad_sum.{k}": self.sum_grad(i) for i, k in enumerate(self.keys)}
        if self.second_order:
            out.update({f"grad_sq.{k}": self.sum_sq(i) for i, k in enumerate(self.keys)})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], batches: int) -> None:
        with torch.no_grad():
            for name, dst in self.state_tensors().items():
                src = tensors[name]
                if src.shape != dst.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != {tuple(dst.shape)}")
                dst.copy_(src)
        self.batches = batches
