"""wanda: weight × input-activation norm, s = |W_ij|·‖X_j‖₂ over all calibration tokens.

Forward passes only (no_grad). ‖X_j‖₂ = sqrt(Σ_tokens x_j²) of the input of each prunable linear
(forward pre-hooks, O(features) memory); group importance = Σ s over the group's weight elements
(biases are not scored). The statistics are of the input activations.
"""

from __future__ import annotations

from prune_core.importance.methods.spec import MethodScores, MethodSpec, ScoreInputs


def wanda_scores(inputs: ScoreInputs) -> MethodScores:
    from prune_core.importance.groups import wanda_group_scores

    assert inputs.input_norm is not None
    return MethodScores(scores=wanda_group_scores(inputs.parts, inputs.targets, inputs.input_norm))


SPEC = MethodSpec(
    key="wanda",
    label="Wanda (|W|·‖X‖)",
    description="forward only · ~half the time · no gradients",
    needs_gradients=False,
    needs_calibration=True,
    needs_fisher=False,
    stats_label="activation",
    stats_noun="activation norm",
    score=wanda_scores,
)
