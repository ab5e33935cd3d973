"""What an importance method declares: `MethodSpec` (metadata + scoring hooks) and what the hooks get.

Importing this module is cheap (no torch): sessions, the TUI and the estimate read the metadata
(key, label, description, what the method needs) without loading the engine. The hooks themselves
import the torch-side helpers (prune_core.importance.groups) when they are first called.

A method plugs into the engine through two hooks:
- `partial(target, parts, grad_sum, sq_sum, aggregation, scratch)` (gradient methods only): one
  scored parameter's share of its groups' scores, computed inside the backward hook of the last
  batch while the sums are in cache (see accumulate.py); the engine keeps the shares in order;
- `score(inputs) -> MethodScores`: the group scores at the end of the pass, from the in-hook
  shares, the gradient sums, the input norms (activation pass) or the weights alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from prune_core.adapters.base import LayerParts
    from prune_core.importance.groups import GroupScores, Target, TaylorPartial

StatsLabel = Literal["gradient", "activation", "weight"]
LayerStats = dict[str, dict[str, list[float]]]


@dataclass
class ScoreInputs:
    """Everything the engine has at the end of a pass; a method reads what it declared it needs."""

    parts: Sequence[LayerParts]
    targets: Sequence[Target]
    aggregation: str
    batches: int = 0
    # gradient pass: the in-hook shares of the last batch (complete, in target order) or None, and
    # the sums by target index (Σg, Σn·g² or None)
    partials: Sequence[TaylorPartial] | None = None
    grad_sum: Callable[[int], torch.Tensor] | None = None
    sq_sum: Callable[[int], torch.Tensor] | None = None
    # activation pass: ‖X_j‖₂ of the input of a target's linear
    input_norm: Callable[[Target], torch.Tensor] | None = None


@dataclass
class MethodScores:
    """A method's output: group scores, the first-order part (second-order methods) and, for
    data-free methods, the per-layer statistics (otherwise the engine aggregates the batches')."""

    scores: GroupScores
    first_order: GroupScores | None = None
    stats: LayerStats | None = None


PartialHook = Callable[
    ["Target", "LayerParts", "torch.Tensor", "torch.Tensor | None", str, "torch.Tensor"], "TaylorPartial"
]
ScoreHook = Callable[[ScoreInputs], MethodScores]


@dataclass(frozen=True)
class MethodSpec:
    """One importance method: what it is called, what it costs, how it scores.

    needs_gradients: a backward pass per batch (gradient memory, ~3× the forward FLOPs);
    needs_calibration: reads calibration tokens at all (False: data-free, no forward pass);
    needs_fisher: keeps Σn·g² per scored parameter (fp32 over the prunable weights);
    stats_label / stats_noun: what the per-layer statistics are statistics of ("gradient",
    "activation" input norms, "weight"), and how reports name them;
    aggregations: the `importance.aggregation` values it honours (others fall back to "element");
    cheaper: the method the diagnosis suggests when this one's extra term turns out negligible.
    """

    key: str
    label: str
    description: str
    needs_gradients: bool
    needs_calibration: bool
    needs_fisher: bool
    stats_label: StatsLabel
    score: ScoreHook
    partial: PartialHook | None = None
    stats_noun: str = "gradient"
    aggregations: tuple[str, ...] = ("element",)
    cheaper: str | None = None

    def __post_init__(self) -> None:
        if self.needs_gradients and self.partial is None:
            raise ValueError(f"method {self.key!r} needs gradients but declares no partial hook")
        if self.needs_gradients and not self.needs_calibration:
            raise ValueError(f"method {self.key!r}: gradients need calibration data")
        if self.needs_fisher and not self.needs_gradients:
            raise ValueError(f"method {self.key!r}: the Fisher diagonal needs gradients")
