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

*Sunk* weights (streaming mode, `linears` given, fused_linear.py): the weight of a plain nn.Linear gets
no `.grad` at all; its backward hands (gy, x) to the accumulator, which checks gy is finite (through
one column of the input gradient, see fused_linear.py) and adds Σg += gyᵀ·x with one `addmm_` — the GEMM the
backward runs anyway — so taylor costs no more memory traffic than the bare loop. taylor_2nd, which
needs g itself for Σn·g², materialises it into one reused buffer. A failing batch is taken back out by
`recompute` (the caller's forward of the same batch): its backward subtracts what was added, exact up
to rounding like the streaming subtraction above.

Statistics can be thinned, by batch (`accumulate(..., stats=False)` skips them) and by rows
(`stats_sample` < 1): for a weight of R rows they read a block of ceil(R·stats_sample) rows, the
block moving with the statistics' index k (it starts at row k·block mod R), so every row is read once
every 1/stats_sample statistics batches; for a sunk weight the block is computed by its own small
GEMM. Biases (1-D) are always read whole. The element counts per parameter of the last batch are in
`counts` (0 where no statistics were taken).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack

import torch
from torch import nn

from prune_core.importance.fused_linear import can_sink, sunk_linears
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
        linears: Mapping[int, nn.Linear] | None = None,
        stats_sample: float = 1.0,
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
        if not 0.0 < stats_sample <= 1.0:
            raise ValueError(f"stats_sample must be in (0, 1], got {stats_sample}")
        self.stats_sample = float(stats_sample)
        self.batches = 0
        self.numels = [p.numel() for p in self.params]
        self.counts = list(self.numels)  # elements the statistics of the last batch read, per parameter
        self._rows = torch.zeros(len(self.params), ROW_WIDTH, dtype=self.dtype, device=self.device)
        self._checks = torch.zeros(len(self.params), dtype=self.dtype, device=self.device)
        self._scratch = torch.empty(max(self.numels), dtype=self.dtype, device=self.device)
        # weights whose gradient goes to _on_sunk instead of .grad (CPU, plain Linear, same dtype); a weight
        # with gradient hooks of its own (Tensor.register_hook: someone rescales or inspects its gradient)
        # keeps the .grad path, since a sunk weight's gradient never exists as a tensor for them to see
        self._sunk: dict[int, nn.Linear] = {
            i: m for i, m in (linears or {}).items()
            if self.streaming and m.weight is self.params[i] and can_sink(m) and m.weight.dtype == self.dtype
            and self.hessian_device == self.device and not getattr(m.weight, "_backward_hooks", None)
        }
        self._gbuf: torch.Tensor | None = None  # taylor_2nd's reused g of a sunk weight
        self._stats_index = 0
        self._with_stats = True
        self._undoing = False
        self._sinks: ExitStack | None = None
        self._attached = False
        self.damaged = False
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
                for i, p in enumerate(self.params) if i not in self._sunk
            ]
            self._sinks = ExitStack()
            self._sinks.enter_context(
                sunk_linears({m: functools.partial(self._on_sunk, i) for i, m in self._sunk.items()}))
            self._attached = True

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._sinks is not None:
            self._sinks.close()
            self._sinks = None
        self._attached = False
        for p in self.params:
            p.grad = None

    @property
    def sunk(self) -> int:
        """How many weights take the summed-in-the-GEMM path."""
        return len(self._sunk)

    def _row_block(self, i: int) -> tuple[int, int]:
        """Rows [lo, hi) of parameter i that this batch's statistics read (all rows when not thinned)."""
        shape = self.params[i].shape
        rows = shape[0]
        if self.stats_sample >= 1.0 or len(shape) < 2:
            return 0, rows
        size = max(1, math.ceil(rows * self.stats_sample))
        lo = (self._stats_index * size) % rows
        return lo, min(lo + size, rows)

    def _stats(self, i: int, g: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Statistics row of parameter i from its gradient g: the rows of this batch's block (or `rows` of g)."""
        lo, hi = self._row_block(i) if rows is None else rows
        part = g if hi - lo == g.shape[0] else g[lo:hi]
        self.counts[i] = part.numel()
        fill_row(part.reshape(-1), self._rows[i], self._scratch)

    def _grad(self, i: int) -> torch.Tensor:
        g = self.params[i].grad
        assert g is not None
        return g if g.dtype == self.dtype else g.to(self.dtype)

    def _on_grad(self, i: int, param: nn.Parameter) -> None:
        if self._undoing:
            return
        self._fired[i] += 1
        if self._fired[i] > 1:
            self._reused = self._reused or self.keys[i]
            return
        with torch.no_grad():
            g = self._grad(i)
            if self._with_stats:
                self._stats(i, g)
            # finite iff Σg² of the whole gradient is: from the statistics row when it read every element
            self._checks[i] = self._rows[i, SUM_SQ] if self.counts[i] == self.numels[i] else torch.dot(
                g.reshape(-1), g.reshape(-1))
            if not self.streaming or self._bad is not None:
                return
            if not math.isfinite(float(self._checks[i])):
                self._bad = self.keys[i]
                return
            self._add(i, g, 1.0)
            if self._finalize is not None:
                self._finalize(i, self._sum_grad[i], self._sum_sq[i])  # type: ignore[arg-type]

    def _on_sunk(self, i: int, gy: torch.Tensor, x: torch.Tensor, probe: torch.Tensor) -> None:
        """The weight gradient gyᵀ·x of sunk parameter i, delivered by its linear's backward."""
        if self._undoing:
            if self._added[i]:
                with torch.no_grad():
                    self._take_back(i, gy, x)
            return
        self._fired[i] += 1
        if self._fired[i] > 1:
            self._reused = self._reused or self.keys[i]
            return
        if self._bad is not None:
            return
        if not math.isfinite(float(probe.sum())):  # before anything is added: a NaN cannot be subtracted
            self._bad = self.keys[i]
            return
        # (a backward runs with gradients off: no torch.no_grad() needed on this hot path)
        if self.second_order:
            g = self._materialise(i, gy, x)
            if self._with_stats:
                self._stats(i, g)
            self._add_sunk(i, g)
        else:
            total = self._sum_grad[i]
            if total is None:
                self._created[i] = True
                self._sum_grad[i] = torch.mm(gy.t(), x)
            else:
                total.addmm_(gy.t(), x)
            self._added[i] = True
            if self._with_stats:  # the statistics' block of rows by its own small GEMM
                lo, hi = self._row_block(i)
                self._stats(i, torch.mm(gy[:, lo:hi].t(), x), rows=(0, hi - lo))
        if self._finalize is not None:
            self._finalize(i, self._sum_grad[i], self._sum_sq[i])  # type: ignore[arg-type]

    def _materialise(self, i: int, gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """g = gyᵀ·x of sunk parameter i in the reused buffer."""
        n = self.numels[i]
        if self._gbuf is None or self._gbuf.numel() < n:
            self._gbuf = torch.empty(max(self.numels[j] for j in self._sunk), dtype=self.dtype, device=self.device)
        return torch.mm(gy.t(), x, out=self._gbuf[:n].view(self.params[i].shape))

    def _add_sunk(self, i: int, g: torch.Tensor) -> None:
        """Σg += g, Σn·g² += n·g² for a materialised g in the reused buffer (copied on first use)."""
        if self._sum_grad[i] is None:
            self._created[i] = True
            self._sum_grad[i] = g.clone()
            self._sum_sq[i] = torch.mul(g, g).mul_(self._weight)
        else:
            self._sum_grad[i].add_(g)  # type: ignore[union-attr]
            self._sum_sq[i].addcmul_(g, g, value=self._weight)  # type: ignore[union-attr]
        self._added[i] = True

    def _take_back(self, i: int, gy: torch.Tensor, x: torch.Tensor) -> None:
        """Subtract what sunk parameter i added in the failed batch (its gradient recomputed)."""
        self._added[i] = False
        if self._created[i]:
            self._sum_grad[i] = self._sum_sq[i] = None
            self._created[i] = False
        elif self.second_order:
            g = self._materialise(i, gy, x)
            self._sum_grad[i].sub_(g)  # type: ignore[union-attr]
            self._sum_sq[i].addcmul_(g, g, value=-self._weight)  # type: ignore[union-attr]
        else:
            self._sum_grad[i].addmm_(gy.t(), x, alpha=-1.0)  # type: ignore[union-attr]

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
        self, loss: torch.Tensor, weight: float = 1.0, *, finalize: Finalizer | None = None,
        stats: bool = True, stats_index: int | None = None, recompute: Callable[[], torch.Tensor] | None = None,
    ) -> list[list[float]]:
        """Backward `loss` with fresh gradients and add them in; returns the per-parameter stat rows.

        Raises NonFiniteGradient (sums unchanged) when any gradient holds NaN/Inf. `finalize`, if
        given, is called as finalize(i, Σg_i, Σn·g²_i or None) after parameter i's addition.
        `stats=False` skips the statistics (the rows come back as zeros, `counts` as 0); `stats_index`
        (default: the batches so far) places the thinned statistics' row block.
        `recompute()` must return the same batch's loss again: when sunk weights were already added
        for a failing batch, its backward takes them back out (without it the sums are left damaged
        and `damaged` is set).
        """
        if not self._attached:
            raise RuntimeError("GradientAccumulator.accumulate needs attach() (or a with block) first")
        if self.damaged:
            raise RuntimeError("the sums were damaged by a failed batch that could not be taken back out")
        for p in self.params:
            p.grad = None
        self._rows.zero_()
        n = len(self.params)
        self._fired, self._added, self._created = [0] * n, [False] * n, [False] * n
        self._bad = self._reused = None
        self._weight = float(weight)
        self._finalize = finalize
        self._stats_index = self.batches if stats_index is None else int(stats_index)
        self._with_stats = stats
        self.counts = [0] * n
        try:
            loss.backward()
            if self._reused is not None:
                raise RuntimeError(
                    f"{self._reused} received two gradients in one backward pass (a weight used twice?); "
                    "the importance engine needs every prunable linear to run once per forward"
                )
            rows = self._rows.tolist()
            if self._bad is None and not self.streaming:
                checks = self._checks.tolist()
                bad = [i for i, c in enumerate(checks) if self._fired[i] and not math.isfinite(c)]
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
                self._take_back_batch(recompute)
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

    def _take_back_batch(self, recompute: Callable[[], torch.Tensor] | None) -> None:
        """Undo the failing batch's additions: hooked parameters from their .grad, sunk ones by recomputing."""
        with torch.no_grad():
            for i, added in enumerate(self._added):
                if added and i not in self._sunk:
                    self._add(i, self._grad(i), -1.0)
        if not any(self._added[i] for i in self._sunk):
            return
        if recompute is None:
            self.damaged = True
            return
        for p in self.params:
            p.grad = None
        self._undoing = True
        try:
            recompute().backward()
        except Exception:  # the batch already failed: what matters now is that the sums are marked damaged
            self.damaged = True
            return
        finally:
            self._undoing = False
        if any(self._added[i] for i in self._sunk):  # the recomputation never reached them
            self.damaged = True

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
        return sum(self.numels) * per

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
