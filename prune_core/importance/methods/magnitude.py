"""magnitude: data-free group L2 norm of the weights, importance = sqrt(Σ w²) over the group.

The group's parameters are those of the adapter's layout (attention group k: its q/k/v rows, o_proj
columns, q/k/v biases where present; MLP channel j: gate/up rows (+ biases), down_proj column). No
calibration pass, no gradients: the statistics are those of the scored weights themselves
(stats_label "weight"), and the result has 0 batches and 0 tokens.
"""

from __future__ import annotations

from prune_core.importance.methods.spec import MethodScores, MethodSpec, ScoreInputs


def magnitude_scores(inputs: ScoreInputs) -> MethodScores:
    from prune_core.importance.groups import magnitude_group_scores, weight_stats

    return MethodScores(
        scores=magnitude_group_scores(inputs.parts, inputs.targets),
        stats=weight_stats(inputs.parts, inputs.targets),
    )


SPEC = MethodSpec(
    key="magnitude",
    label="Magnitude (‖W‖₂)",
    description="weights only · no data, no gradients · seconds · a baseline",
    needs_gradients=False,
    needs_calibration=False,
    needs_fisher=False,
    stats_label="weight",
    stats_noun="weight",
    score=magnitude_scores,
)
