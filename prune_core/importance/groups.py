"""Which parameters the importance pass scores, and how element scores sum into prunable groups.

The group definitions are the adapter's (see prune_core/adapters/base.py):
- attention group k of a layer = KV head k: rows [k·d, (k+1)·d) of k_proj and v_proj (and their
  biases), rows [k·r·d, (k+1)·r·d) of q_proj (and its bias), columns [k·r·d, (k+1)·r·d) of o_proj;
- MLP channel j = row j of gate_proj and up_proj (and their biases), column j of down_proj.
o_proj / down_proj biases belong to no group, so they are not targets.

Because the rows (columns) of one group are contiguous, summing a parameter-shaped tensor over a
group is a reshape plus a sum: rows → `t.reshape(G, -1).sum(1)`, columns →
`t.reshape(out, G, -1).sum((0, 2))`. Everything here works in float64 so the scores of a group
(up to 4·r·d·hidden elements) do not lose precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from prune_core.adapters.base import LayerParts

ROW_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
COLUMN_MODULES = ("o_proj", "down_proj")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Target:
    """One scored parameter: a prunable weight, or a q/k/v/gate/up bias."""

    key: str  # "layers.3.q_proj.weight"
    layer: int
    module: str  # q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj
    kind: str  # weight | bias
    param: nn.Parameter

    @property
    def block(self) -> str:
        return "attention" if self.module in ATTENTION_MODULES else "mlp"


def prunable_targets(parts: Sequence[LayerParts]) -> list[Target]:
    """All parameters that carry group importance, in layer order (weights, then biases per module)."""
    targets: list[Target] = []
    for layer, p in enumerate(parts):
        linears = {**p.attention_linears, **p.mlp_linears}
        for module, linear in linears.items():
            targets.append(Target(f"layers.{layer}.{module}.weight", layer, module, "weight", linear.weight))
            if module in ROW_MODULES and linear.bias is not None:
                targets.append(Target(f"layers.{layer}.{module}.bias", layer, module, "bias", linear.bias))
    return targets


def num_groups(parts: LayerParts, block: str) -> int:
    return parts.num_kv_heads if block == "attention" else parts.intermediate_size


def group_sum(values: torch.Tensor, target: Target, parts: LayerParts) -> torch.Tensor:
    """Sum a tensor shaped like `target.param` over each group of its block → [groups]."""
    groups = num_groups(parts, target.block)
    if target.module in ROW_MODULES:
        return values.reshape(groups, -1).sum(1)
    return values.reshape(values.shape[0], groups, -1).sum((0, 2))


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


def taylor_group_scores(
    parts: Sequence[LayerParts],
    targets: Sequence[Target],
    mean_grad: Callable[[Target], torch.Tensor],
    fisher: Callable[[Target], torch.Tensor] | None,
    aggregation: str,
) -> tuple[GroupScores, GroupScores | None]:
    """Taylor importance of every group; returns (total, first_order part or None).

    aggregation "element": Σ_group |w·ḡ|   (+ 0.5·Σ_group w²·F when `fisher` is given)
    aggregation "vector":  |Σ_group w·ḡ|   (+ 0.5·Σ_group w²·F)
    """
    first: dict[tuple[int, str], torch.Tensor] = {}
    second: dict[tuple[int, str], torch.Tensor] = {}
    for t in targets:
        w = t.param.detach().to(torch.float64)  # may alias a float64 weight: no in-place ops on w
        prod = w * mean_grad(t).to(w.device, torch.float64)
        if aggregation == "element":
            prod = prod.abs_()
        key = (t.layer, t.block)
        part = group_sum(prod, t, parts[t.layer])
        first[key] = first[key] + part if key in first else part
        if fisher is not None:
            sq = w.square().mul_(fisher(t).to(w.device, torch.float64))
            part2 = group_sum(sq, t, parts[t.layer])
            second[key] = second[key] + part2 if key in second else part2
    if aggregation == "vector":
        first = {k: v.abs() for k, v in first.items()}

    def assemble(values: dict[tuple[int, str], torch.Tensor], scale: float) -> GroupScores:
        return GroupScores(
            attention=pad_rows([values[(i, "attention")] * scale for i in range(len(parts))]),
            mlp=pad_rows([values[(i, "mlp")] * scale for i in range(len(parts))]),
        )

    first_scores = assemble(first, 1.0)
    if fisher is None:
        return first_scores, None
    second_scores = assemble(second, 0.5)
    total = GroupScores(
        attention=first_scores.attention + second_scores.attention,
        mlp=first_scores.mlp + second_scores.mlp,
    )
    return total, first_scores


def wanda_group_scores(
    parts: Sequence[LayerParts],
    targets: Sequence[Target],
    input_norm: Callable[[Target], torch.Tensor],
) -> GroupScores:
    """Wanda importance: Σ_group |W_ij|·‖X_j‖₂ over the group's weight elements (biases excluded).

    `input_norm(target)` is ‖X_j‖₂ = sqrt(Σ_tokens x_j²) of the input of the target's linear.
    """
    totals: dict[tuple[int, str], torch.Tensor] = {}
    for t in targets:
        if t.kind != "weight":
            continue
        w = t.param.detach().to(torch.float64)
        norm = input_norm(t).to(w.device, torch.float64)
        part = group_sum(w.abs().mul_(norm[None, :]), t, parts[t.layer])
        key = (t.layer, t.block)
        totals[key] = totals[key] + part if key in totals else part
    return GroupScores(
        attention=pad_rows([totals[(i, "attention")] for i in range(len(parts))]),
        mlp=pad_rows([totals[(i, "mlp")] for i in range(len(parts))]),
    )
