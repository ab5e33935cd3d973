"""taylor: first-order Taylor importance, s = |w·ḡ| per element (ḡ = mean gradient over the batches).

Group importance: Σ s over the group's parameters (aggregation "element") or |Σ w·ḡ| ("vector").
One forward + backward per batch; the gradient sums Σg are kept per scored parameter.
"""

from __future__ import annotations

from prune_core.importance.methods.spec import MethodScores, MethodSpec, ScoreInputs


def taylor_scores(inputs: ScoreInputs) -> MethodScores:
    """Group scores from the in-hook shares of the last batch, or one pass over the sums."""
    from prune_core.importance.groups import assemble_taylor, taylor_group_scores

    if inputs.partials is not None and len(inputs.partials) == len(inputs.targets):
        total, first = assemble_taylor(
            inputs.parts, inputs.targets, inputs.partials, inputs.batches, inputs.aggregation
        )
    else:  # no last batch in this session (resumed at the very end)
        assert inputs.grad_sum is not None
        total, first = taylor_group_scores(
            inputs.parts, inputs.targets, inputs.grad_sum, inputs.sq_sum, inputs.batches, inputs.aggregation
        )
    return MethodScores(scores=total, first_order=first)


def taylor_share(*args: object) -> object:
    """The partial hook: groups.taylor_partial (imported on first use, so this module stays light)."""
    from prune_core.importance.groups import taylor_partial

    return taylor_partial(*args)  # type: ignore[arg-type]


SPEC = MethodSpec(
    key="taylor",
    label="Taylor (1st order)",
    description="1 fwd+bwd per batch · good accuracy · the default",
    needs_gradients=True,
    needs_calibration=True,
    needs_fisher=False,
    stats_label="gradient",
    stats_noun="gradient",
    aggregations=("element", "vector"),
    partial=taylor_share,  # type: ignore[arg-type]
    score=taylor_scores,
)
