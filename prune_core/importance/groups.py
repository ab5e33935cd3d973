"""Which parameters the importance pass scores, and how element scores sum into prunable groups.

The group definitions are the adapter's declared layout (`LayerParts.layout`, see
prune_core/adapters/base.py): every sliced weight is a target, and so is the bias of every
row-sliced module (q/k/v/gate/up, or a fused qkv_proj / gate_up_proj); output-projection biases
(o_proj / down_proj) belong to no group, so they are not targets. Default (Llama family):
- attention group k of a layer = KV head k: rows [k·d, (k+1)·d) of k_proj and v_proj (and their
  biases), rows [k·r·d, (k+1)·r·d) of q_proj (and its bias), columns [k·r·d, (k+1)·r·d) of o_proj;
- MLP channel j = row j of gate_proj and up_proj (and their biases), column j of down_proj.

Summing a parameter-shaped tensor over a group is: sum along the other axis (a row or column sum),
then `Slice.group_sums` over each of the parameter's slices (a reshape plus a sum when the groups
are contiguous). Everything after the row/column sums is float64 so the scores of a group (up to
4·r·d·hidden elements) do not lose precision.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prune_core.adapters.base import LayerParts, Slice
from prune_core.importance.stats import BlockStats, fill_row


@dataclass(frozen=True)
class Target:
    """One scored parameter: a sliced weight, or the bias of a row-sliced module."""

    key: str  # "layers.3.q_proj.weight"
    layer: int
    module: str  # leaf name: q_proj | k_proj | ... | qkv_proj | gate_up_proj
    kind: str  # weight | bias
    param: nn.Parameter
    block: str  # attention | mlp
    slices: tuple[Slice, ...]  # the layout's slices of this module (biases: the row slices only)
    path: str = ""  # module path relative to the layer ("self_attn.q_proj")


def prunable_targets(parts: Sequence[LayerParts]) -> list[Target]:
    """All parameters that carry group importance, in layer order (weights, then biases per module)."""
    targets: list[Target] = []
    for layer, p in enumerate(parts):
        for gl in p.layout.blocks:
            for path in gl.modules():
                linear = p.linear(path)
                name = path.rsplit(".", 1)[-1]
                slices = gl.slices_of(path)
                targets.append(Target(f"layers.{layer}.{name}.weight", layer, name, "weight", linear.weight,
                                      gl.block, slices, path))
                rows = tuple(s for s in slices if s.axis == 0)
                if rows and linear.bias is not None:
                    targets.append(Target(f"layers.{layer}.{name}.bias", layer, name, "bias", linear.bias,
                                          gl.block, rows, path))
    return targets


def targets_digest(targets: Sequence[Target]) -> tuple[str, str]:
    """(sha256 of names/shapes/dtypes, sha256 of the first 64 values of every scored parameter)."""
    layout, sample = hashlib.sha256(), hashlib.sha256()
    for t in targets:
        layout.update(f"{t.key}:{tuple(t.param.shape)}:{t.param.dtype};".encode())
        head = t.param.detach().reshape(-1)[:64].to("cpu", torch.float64).contiguous()
        sample.update(head.numpy().tobytes())
    return layout.hexdigest(), sample.hexdigest()


def num_groups(parts: LayerParts, block: str) -> int:
    return parts.layout.block(block).groups


def pad_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer vectors into [L, max_len] float64; layers with fewer groups are padded with NaN."""
    width = max((r.numel() for r in rows), default=0)
    out = torch.full((len(rows), width), float("nan"), dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r.detach().to("cpu", torch.float64)
    return out


@dataclass
class GroupScores:
    """Per-layer group importance: attention [L, kv_heads], mlp [L, intermediate] (float64, NaN-padded)."""

    attention: torch.Tensor
    mlp: torch.Tensor


def reduce_to_groups(
    target: Target, parts: LayerParts, axis_sums: Callable[[int], torch.Tensor]
) -> torch.Tensor:
    """Σ per group of a parameter-shaped quantity → float64 [groups].

    `axis_sums(axis)` gives the quantity summed down to a vector along `axis` (0: one value per
    row, 1: one per column); each slice then sums its groups' indices, in float64.
    """
    groups = num_groups(parts, target.block)
    out: torch.Tensor | None = None
    vectors: dict[int, torch.Tensor] = {}
    for s in target.slices:
        if s.axis not in vectors:
            vectors[s.axis] = axis_sums(s.axis).to(torch.float64)
        part = s.group_sums(vectors[s.axis], groups)
        out = part if out is None else out + part
    assert out is not None
    return out


def _reduce_rows_or_columns(values: torch.Tensor, target: Target, parts: LayerParts) -> torch.Tensor:
    """Sum `values` (shaped like the parameter) per group → float64 [groups].

    Sums along each row (or column) first in the tensor's own dtype — at most `in_features` (or
    `out_features`) elements, pairwise-summed — then across rows in float64.
    """
    if values.dim() == 1:
        return reduce_to_groups(target, parts, lambda axis: values)
    return reduce_to_groups(target, parts, lambda axis: values.sum(1 if axis == 0 else 0))


TaylorPartial = tuple[torch.Tensor, torch.Tensor | None]


def taylor_partial(
    target: Target,
    parts: LayerParts,
    grad_sum: torch.Tensor,
    sq_sum: torch.Tensor | None,
    aggregation: str,
    scratch: torch.Tensor,
) -> TaylorPartial:
    """One parameter's contribution to its groups, before division by the number of batches B.

    Returns (Σ_group |w·Σg| — or the signed Σ_group w·Σg for "vector" —, Σ_group w²·Σn·g² or None),
    float64 [groups]. `scratch` is a reusable buffer of at least param.numel() elements of
    grad_sum's dtype (no allocation per parameter).
    """
    w = target.param.detach()
    if w.dtype != grad_sum.dtype or w.device != grad_sum.device:
        w = w.to(grad_sum.device, grad_sum.dtype)
    buf = scratch[: w.numel()].view(w.shape)
    prod = torch.mul(w, grad_sum, out=buf)
    if aggregation == "element":
        prod.abs_()
    first = _reduce_rows_or_columns(prod, target, parts)
    second = None
    if sq_sum is not None:
        if sq_sum.device != buf.device:
            sq_sum = sq_sum.to(buf.device)
        torch.mul(w, w, out=buf).mul_(sq_sum)
        second = _reduce_rows_or_columns(buf, target, parts)
    return first, second


def assemble_taylor(
    parts: Sequence[LayerParts],
    targets: Sequence[Target],
    partials: Sequence[TaylorPartial],
    batches: int,
    aggregation: str,
) -> tuple[GroupScores, GroupScores | None]:
    """Sum the partials per group and scale: returns (total, first-order part or None).

    aggregation "element": Σ_group |w·ḡ|   (+ 0.5·Σ_group w²·F when second-order sums are present)
    aggregation "vector":  |Σ_group w·ḡ|   (+ 0.5·Σ_group w²·F)
    with ḡ = Σg / B and F = Σn·g² / B.
    """
    first: dict[tuple[int, str], torch.Tensor] = {}
    second: dict[tuple[int, str], torch.Tensor] = {}
    for t, (p1, p2) in zip(targets, partials, strict=True):
        key = (t.layer, t.block)
        first[key] = first[key] + p1.cpu() if key in first else p1.cpu()
        if p2 is not None:
            second[key] = second[key] + p2.cpu() if key in second else p2.cpu()
    if aggregation == "vector":
        first = {k: v.abs() for k, v in first.items()}

    empty = torch.zeros(0, dtype=torch.float64)  # a block surgery removed entirely has no groups

    def assemble(values: dict[tuple[int, str], torch.Tensor], scale: float) -> GroupScores:
        return GroupScores(
            attention=pad_rows([values.get((i, "attention"), empty) * scale for i in range(len(parts))]),
            mlp=pad_rows([values.get((i, "mlp"), empty) * scale for i in range(len(parts))]),
        )

    b = max(batches, 1)
    first_scores = assemble(first, 1.0 / b)
    if not second:
        return first_scores, None
    second_scores = assemble(second, 0.5 / b)
    total = GroupScores(
        attention=first_scores.attention + second_scores.attention,
        mlp=first_scores.mlp + second_scores.mlp,
    )
    return total, first_scores


def taylor_group_scores(
    parts: Sequence[LayerParts],
    targets: Sequence[Target],
    grad_sum: Callable[[int], torch.Tensor],
    sq_sum: Callable[[int], torch.Tensor] | None,
    batches: int,
    aggregation: str,
) -> tuple[GroupScores, GroupScores | None]:
    """Taylor importance of every group from the sums (grad_sum(i) = Σg of targets[i], ...)."""
    if not targets:
        raise ValueError("no targets")
    first = grad_sum(0)
    scratch = torch.empty(max(t.param.numel() for t in targets), dtype=first.dtype, device=first.device)
    partials = [
        taylor_partial(t, parts[t.layer], grad_sum(i), sq_sum(i) if sq_sum else None, aggregation, scratch)
        for i, t in enumerate(targets)
    ]
    return assemble_taylor(parts, targets, partials, batches, aggregation)


def _by_block(parts: Sequence[LayerParts], totals: dict[tuple[int, str], torch.Tensor]) -> GroupScores:
    def row(i: int, block: str) -> torch.Tensor:
        return totals.get((i, block), torch.zeros(num_groups(parts[i], block), dtype=torch.float64))

    return GroupScores(
        attention=pad_rows([row(i, "attention") for i in range(len(parts))]),
        mlp=pad_rows([row(i, "mlp") for i in range(len(parts))]),
    )


def wanda_group_scores(
    parts: Sequence[LayerParts],
    targets: Sequence[Target],
    input_norm: Callable[[Target], torch.Tensor],
) -> GroupScores:
    """Wanda importance: Σ_group |W_ij|·‖X_j‖₂ over the group's weight elements (biases excluded).

    `input_norm(target)` is ‖X_j‖₂ = sqrt(Σ_tokens x_j²) of the input of the target's linear. Row
    slices (q/k/v/gate/up) reduce as |W|·‖X‖ (a matrix-vector product), column slices (o/down) as
    ‖X_j‖·Σ_i |W_ij|.
    """
    weights = [t for t in targets if t.kind == "weight"]
    dtype = torch.promote_types(weights[0].param.dtype, torch.float32)
    device = weights[0].param.device
    scratch = torch.empty(max(t.param.numel() for t in weights), dtype=dtype, device=device)
    totals: dict[tuple[int, str], torch.Tensor] = {}
    for t in weights:
        w = t.param.detach()
        a = torch.abs(w, out=scratch[: w.numel()].view(w.shape)) if w.dtype == dtype else w.to(dtype).abs_()
        norm = input_norm(t).to(device, dtype)

        def per(axis: int, a: torch.Tensor = a, norm: torch.Tensor = norm) -> torch.Tensor:
            return torch.mv(a, norm) if axis == 0 else a.sum(0) * norm

        part = reduce_to_groups(t, parts[t.layer], per).cpu()
        key = (t.layer, t.block)
        totals[key] = totals[key] + part if key in totals else part
    return _by_block(parts, totals)


def magnitude_group_scores(parts: Sequence[LayerParts], targets: Sequence[Target]) -> GroupScores:
    """Magnitude importance: sqrt(Σ w²) over all of the group's parameters (weights and biases)."""
    totals: dict[tuple[int, str], torch.Tensor] = {}
    for t in targets:
        w = t.param.detach()
        sq = w.to(torch.promote_types(w.dtype, torch.float32)).square()
        part = _reduce_rows_or_columns(sq, t, parts[t.layer]).cpu()
        key = (t.layer, t.block)
        totals[key] = totals[key] + part if key in totals else part
    scores = _by_block(parts, totals)
    return GroupScores(attention=scores.attention.sqrt(), mlp=scores.mlp.sqrt())


def weight_stats(parts: Sequence[LayerParts], targets: Sequence[Target]) -> dict[str, dict[str, list[float]]]:
    """Per-layer statistics (stats.py: mean/std/norm/max/min of |x|) of the scored parameters themselves."""
    plan = BlockStats([(t.layer, t.block) for t in targets], len(parts))
    rows, counts = [], []
    for t in targets:
        flat = t.param.detach().reshape(-1)
        flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
        out = torch.zeros(5, dtype=flat.dtype, device=flat.device)
        fill_row(flat, out, torch.empty_like(flat))
        rows.append(out.tolist())
        counts.append(flat.numel())
    return plan.combine(rows, counts)
