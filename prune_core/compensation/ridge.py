"""The ridge refit's closed form and the sums it is computed from (used by reconstruct.py).

Why a module of its own: the layer-wise loop (reconstruct.py) decides *what* each refit should
reproduce; this module holds the mathematics every refit shares — the minimiser of a ridge
least-squares problem written as the kept weights plus a correction, and the sums accumulated over
calibration tokens (`GramSums`: what the solve reads of X̃ᵀX̃; `CrossSums`: the error-feedback cross
term), in a form that a data-parallel run can all-reduce. Tests check `ridge_refit` against numpy's
lstsq on the stacked system and the sums against a float64 X̃ᵀX̃.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from prune_core import distributed
from prune_core.errors import BadInput

BiasMode = Literal["shrink", "fit", "none"]
BIAS_MODES: tuple[str, ...] = ("shrink", "fit", "none")
DEFAULT_BIAS: BiasMode = "shrink"
# Products of a batch are summed in their own dtype (float32) over this many tokens, then added to the
# Gram's dtype (float64): a float32 sum of a few thousand tokens loses nothing next to the ridge term.
FLUSH_ROWS = 8192

__all__ = ["BIAS_MODES", "DEFAULT_BIAS", "FLUSH_ROWS", "CrossSums", "GramParts", "GramSums", "ProductSum",
           "ridge_refit", "rows_of"]


@dataclass
class GramParts:
    """What the refit reads of an augmented Gram C̃ = X̃ᵀX̃ (X̃ = [X, 1], n inputs) for the kept inputs K
    and the removed inputs R: C[K, K], C[R, K], Σ X and the token count. `GramSums` accumulates exactly
    these; `from_augmented` takes them out of a whole (n+1)² matrix."""

    kk: torch.Tensor  # C[K, K] [k, k]
    rk: torch.Tensor  # C[R, K] [n - k, k]
    sum: torch.Tensor  # Σ X [n]
    count: float
    keep: torch.Tensor  # K, long [k]
    rest: torch.Tensor  # R, long [n - k]

    @staticmethod
    def from_augmented(gram: torch.Tensor, keep: torch.Tensor) -> GramParts:
        n = gram.shape[0] - 1
        removed = torch.ones(n, dtype=torch.bool, device=gram.device)
        removed[keep] = False
        rest = removed.nonzero().flatten()
        rows_k = gram.index_select(0, keep)
        return GramParts(kk=rows_k.index_select(1, keep), rk=gram.index_select(0, rest).index_select(1, keep),
                         sum=gram[:n, n].clone(), count=float(gram[n, n]), keep=keep, rest=rest)

    def with_constant(self, const: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(C̃[K, K′], C̃[R, K′], C̃[n, K′]): K′ = K plus the constant column when `const`."""
        s_k, s_r = self.sum.index_select(0, self.keep), self.sum.index_select(0, self.rest)
        if not const:
            return self.kk, self.rk, s_k
        count = torch.tensor([self.count], dtype=self.kk.dtype, device=self.kk.device)
        return (torch.cat([self.kk, s_k[:, None]], dim=1), torch.cat([self.rk, s_r[:, None]], dim=1),
                torch.cat([s_k, count]))


def ridge_refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor | GramParts,
                keep: Sequence[int], *, ridge: float, bias_mode: str = DEFAULT_BIAS,
                cross: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge refit of a projection whose input columns not in `keep` are removed.

    weight [out, n], bias [out] or None; gram [n+1, n+1] = X̃ᵀX̃ with X̃ = [X, 1] (the last row /
    column is the constant), or the `GramParts` of it for `keep`. Returns (new weight [out, len(keep)],
    new bias [out] or None) in the gram's dtype: the minimiser of ‖X̃_K′ W′ᵀ − (X̃ W̃ᵀ + E)‖² +
    λ‖W′_K − W_K‖² (+ λ‖b′ − b‖² for "shrink"), λ = ridge × mean(diag gram[K, K]). bias_mode "none"
    fits no bias and returns the original. E is an extra target the refit should also produce (error
    feedback: what earlier layers left wrong in the stream); `cross` = X̃_K′ᵀ E, [len(K′), out], K′ =
    keep plus the constant column unless bias_mode is "none"; None means E = 0. With λ = ∞ it has no
    effect.
    """
    if bias_mode not in BIAS_MODES:
        raise BadInput(f"unknown bias mode {bias_mode!r}", f"use one of: {', '.join(BIAS_MODES)}")
    if not (ridge >= 0):  # also rejects NaN
        raise BadInput(f"ridge must be >= 0 (got {ridge!r})", "use ridge = 0 (plain least squares) or more")
    out_f, n = weight.shape
    if isinstance(gram, GramParts):
        parts = gram
        if parts.keep.numel() + parts.rest.numel() != n:
            raise BadInput(f"the Gram parts cover {parts.keep.numel() + parts.rest.numel()} inputs, expected {n}",
                           "accumulate them over the projection's input")
    else:
        if gram.shape != (n + 1, n + 1):
            raise BadInput(f"the Gram matrix is {tuple(gram.shape)}, expected {(n + 1, n + 1)}",
                           "accumulate it over the projection's input with a constant-1 column")
        parts = GramParts.from_augmented(gram, torch.as_tensor(list(keep), dtype=torch.long, device=gram.device))
    dtype, dev = parts.kk.dtype, parts.kk.device
    k = parts.keep
    w = weight.detach().to(device=dev, dtype=dtype)
    b = torch.zeros(out_f, dtype=dtype, device=dev) if bias is None else bias.detach().to(device=dev, dtype=dtype)
    with_bias = bias_mode != "none"
    if math.isinf(ridge) or k.numel() == 0:
        w_k = w.index_select(1, k)
        if bias_mode == "fit" or (k.numel() == 0 and with_bias):
            # W_K fixed: the least-squares bias is the mean of what the removed columns contributed
            # (plus the mean of the extra target E: the cross term's constant row is Σ E)
            mean = parts.sum / parts.count
            new_b = b + w.index_select(1, parts.rest) @ mean.index_select(0, parts.rest)
            if cross is not None:
                new_b = new_b + cross[-1].to(device=dev, dtype=dtype) / parts.count
            return w_k, new_b
        return w_k, (None if bias is None else b)
    lam = float(ridge) * float(torch.diagonal(parts.kk).mean())
    size = k.numel() + (1 if with_bias else 0)
    if cross is not None and cross.shape != (size, out_f):
        raise BadInput(f"the error cross term is {tuple(cross.shape)}, expected {(size, out_f)}",
                       "accumulate X̃_K′ᵀ E over the kept inputs (and the constant column unless bias is none)")
    return _refit_correction(w, b, bias, parts, lam, bias_mode, cross)


def _refit_correction(w: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, parts: GramParts,
                      lam: float, bias_mode: str, cross: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ridge_refit's closed form as the kept weights plus a correction: with A = C̃[K′, K′] + D (D the
    shrinkage) the numerator W̃ C̃[:, K′] + W̃_K′ D equals W̃_K′ A + W̃_R C̃[R, K′] (R = removed columns), so

        W′ = W̃_K′ + (W̃_R C̃[R, K′] + crossᵀ) A⁻¹

    — the same minimiser with a product over the removed columns only (a third of the multiply-adds of
    W̃ C̃[:, K′] at 20 %), and the solve gives the small correction rather than the whole weight. For a
    singular A (λ = 0 and rank-deficient inputs) the minimum-norm correction is taken: the least-squares
    solution nearest the original weights, the λ → 0 limit of the ridge solution."""
    dtype, dev = parts.kk.dtype, parts.kk.device
    k = parts.keep
    with_bias = bias_mode != "none"
    c_kk, c_rk, c_nk = parts.with_constant(with_bias)
    if with_bias:
        kept = torch.cat([w.index_select(1, k), b[:, None]], dim=1)  # W̃_K′
        a = torch.cat([c_kk, c_nk[None, :]], dim=0)
        shrink = torch.full((k.numel() + 1,), lam, dtype=dtype, device=dev)
        if bias_mode == "fit":
            shrink[-1] = 0.0
    else:
        kept = w.index_select(1, k)
        a = c_kk.clone()
        shrink = torch.full((k.numel(),), lam, dtype=dtype, device=dev)
    a.diagonal().add_(shrink)
    corr = w.index_select(1, parts.rest) @ c_rk  # W̃_R C̃[R, K′]: no bias in R
    if cross is not None:
        corr = corr + cross.to(device=dev, dtype=dtype).T
    new = kept + _solve_spd(a, corr.T).T
    if with_bias:
        return new[:, :-1].contiguous(), new[:, -1].contiguous()
    return new.contiguous(), (None if bias is None else b)


def _solve_spd(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve a X = rhs for symmetric positive (semi)definite a: Cholesky, else minimum-norm lstsq."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        sol = torch.cholesky_solve(rhs, chol)
        if bool(torch.isfinite(sol).all()):
            return sol
    dev = a.device
    res = torch.linalg.lstsq(a.cpu(), rhs.cpu(), driver="gelsd")
    return res.solution.to(dev)


def rows_of(x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """`x` as rows [tokens, features] in the dtype one batch's products are computed in: float32 (or
    the activations' wider dtype), at most the accumulator's. A float64 product costs ~2x and the
    batch sums (a few thousand rows) lose nothing that matters next to the ridge term."""
    work = x.detach().reshape(-1, x.shape[-1])
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    return work.to(acc) if work.dtype.itemsize > acc.itemsize else work


class ProductSum:
    """A sum of matrix products kept in `dtype` (the Gram's), fed by products in the batch's own dtype:
    each product is added into a buffer of that dtype by `addmm_` (no temporary, no conversion per
    batch) and the buffer is added to the sum every `FLUSH_ROWS` rows and before it is read."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.total = torch.zeros(shape, dtype=dtype, device=device)
        self.part: torch.Tensor | None = None
        self.rows = 0

    def addmm(self, a: torch.Tensor, b: torch.Tensor, rows: int) -> None:
        """Add a @ b (a and b of one dtype, the products' dtype; the sum's or narrower)."""
        if a.dtype == self.total.dtype:
            self.total.addmm_(a, b)
            return
        if self.part is None:
            self.part = torch.zeros(self.total.shape, dtype=a.dtype, device=a.device)
        self.part.addmm_(a, b)
        self.rows += rows
        if self.rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> torch.Tensor:
        """The sum, with everything added so far."""
        if self.part is not None and self.rows:
            self.total += self.part
            self.part.zero_()
            self.rows = 0
        return self.total


class GramSums:
    """Σ X̃ᵀX̃ over tokens with X̃ = [X, 1], kept in `gram_dtype`: only what the refit reads (`GramParts`)
    — C[K, K] for the kept inputs K, of which only the first half of the rows and the lower right
    block are computed (it is symmetric: 3/4 of the products), C[R, K] for the removed inputs R — plus
    Σ X and the count; `keep` empty: the sums only."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, keep: Sequence[int]) -> None:
        self.n = n
        self.keep = torch.as_tensor(list(keep), dtype=torch.long, device=device)
        removed = torch.ones(n, dtype=torch.bool, device=device)
        removed[self.keep] = False
        self.rest = removed.nonzero().flatten()
        k, r = self.keep.numel(), self.rest.numel()
        self.half = k // 2
        self.top = ProductSum((self.half, k), dtype, device) if self.half else None  # C[K[:h], K]
        self.corner = ProductSum((k - self.half, k - self.half), dtype, device) if k else None  # C[K[h:], K[h:]]
        self.rk = ProductSum((r, k), dtype, device) if k and r else None  # C[R, K]
        self.sum = torch.zeros(n, dtype=dtype, device=device)
        self.count = 0

    def _sums(self) -> list[ProductSum]:
        return [t for t in (self.top, self.corner, self.rk) if t is not None]

    def add(self, x: torch.Tensor) -> torch.Tensor:
        """Add one batch's inputs; returns its kept columns as rows [tokens, |K|] (for the cross sums)."""
        work = rows_of(x, self.sum.dtype)  # the product per batch in float32, summed in the Gram's dtype
        xk = work.index_select(1, self.keep)
        rows, h = work.shape[0], self.half
        if self.top is not None:
            self.top.addmm(xk[:, :h].T, xk, rows)
        if self.corner is not None:
            self.corner.addmm(xk[:, h:].T, xk[:, h:], rows)
        if self.rk is not None:
            self.rk.addmm(work.index_select(1, self.rest).T, xk, rows)
        self.sum += work.sum(0, dtype=self.sum.dtype)
        self.count += rows
        return xk

    def all_reduce(self, world: distributed.World) -> None:
        """Sum every rank's partial sums into each rank's (a collective call; nothing in a world of one)."""
        if not world.active:
            return
        world.all_reduce_([*(t.flush() for t in self._sums()), self.sum])
        self.count = int(world.sum_numbers([self.count])[0])

    def parts(self) -> GramParts:
        """C[K, K] (mirrored to full), C[R, K], Σ X and the count."""
        k, h = self.keep.numel(), self.half
        dtype, dev = self.sum.dtype, self.sum.device
        kk = torch.zeros(k, k, dtype=dtype, device=dev)
        if self.top is not None:
            top = self.top.flush()
            kk[:h] = top
            kk[h:, :h] = top[:, h:].T
        if self.corner is not None:
            kk[h:, h:] = self.corner.flush()
        rk = self.rk.flush() if self.rk is not None else torch.zeros(self.rest.numel(), k, dtype=dtype, device=dev)
        return GramParts(kk=kk, rk=rk, sum=self.sum, count=float(self.count), keep=self.keep, rest=self.rest)


class CrossSums:
    """Σ X̃_K′ᵀ Y over tokens: the kept inputs (plus the constant column when `const`) against Y, what the
    block should add to the pruned stream to reach the dense one (error feedback), accumulated like the
    Gram. `to_error` turns it into Σ X̃_K′ᵀ E with E = Y − (the original block's output), the form
    `ridge_refit` takes, from the Gram alone: the original projection never runs on the pruned stream."""

    def __init__(self, keep: Sequence[int], const: bool, out: int, dtype: torch.dtype, device: torch.device) -> None:
        self.keep = torch.as_tensor(list(keep), dtype=torch.long, device=device)
        self.const = const
        self.xy = ProductSum((self.keep.numel(), out), dtype, device) if self.keep.numel() else None
        self.y = torch.zeros(out, dtype=dtype, device=device)  # Σ Y: the constant column's row
        self.xe: torch.Tensor | None = None  # Σ X̃_K′ᵀ E, set by to_error

    def add(self, xk: torch.Tensor, target: torch.Tensor) -> None:
        """xk: the batch's kept inputs as rows (what `GramSums.add` returns); target: Y of the same tokens."""
        y = rows_of(target, self.y.dtype).to(xk.dtype)
        if self.xy is not None:
            self.xy.addmm(xk.T, y, y.shape[0])
        self.y += y.sum(0, dtype=self.y.dtype)

    def all_reduce(self, world: distributed.World) -> None:
        """Sum every rank's partial cross sums (a collective call; nothing in a world of one)."""
        world.all_reduce_([t for t in (self.xy.flush() if self.xy is not None else None, self.y) if t is not None])

    def to_error(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: GramParts) -> None:
        """Σ X̃_K′ᵀ Y → `xe` = Σ X̃_K′ᵀ (Y − X̃ W̃ᵀ) (W̃ = [W, b]) from the Gram parts of all ranks:
        W̃ C̃[:, K′] = W_K C̃[K, K′] + W_R C̃[R, K′] + b C̃[n, K′]."""
        dtype, dev = parts.kk.dtype, parts.kk.device
        w = weight.to(device=dev, dtype=dtype)
        c_kk, c_rk, c_nk = parts.with_constant(self.const)
        wc = w.index_select(1, parts.keep) @ c_kk + w.index_select(1, parts.rest) @ c_rk
        if bias is not None:
            wc += bias.to(device=dev, dtype=dtype)[:, None] * c_nk[None, :]
        rows = [self.xy.flush()] if self.xy is not None else []
        if self.const:
            rows.append(self.y[None, :])
        xy = torch.cat(rows) if rows else torch.zeros(0, w.shape[0], dtype=dtype, device=dev)
        self.xe = xy - wc.T
