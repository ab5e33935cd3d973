"""The recommended configuration: the best one measured on held-out text (BENCHMARKS.md, "Quality").

The schema's own defaults are the plain baseline (one global taylor ranking, no compensation), so an
empty session file stays the simplest run. `prune new`, `examples/quickstart.toml` and a new session
in the workbench start from `RECOMMENDED` instead: on smollm2-135m it beats an LLM-Pruner-like setting
on the calibration domain and on another domain at 20 % and 40 % (see the README and BENCHMARKS.md).
"""

from __future__ import annotations

from typing import Any

from sessions.schema import Session

RECOMMENDED: dict[str, Any] = {
    "importance.method": "taylor_2nd",  # element-wise second-order Taylor (+ Fisher)
    "data.num_samples": 32,
    "data.generated_samples": 128,  # + 128 windows the model writes itself: the pruned model stays general
    "pruning.blocks": "both",
    # below ratio 0.3 one global ranking over heads and channels; from 0.3 the same MLP rate in every
    # unprotected layer with every head kept (each the better on held-out text at its ratio)
    "pruning.allocation": "auto",
    "pruning.protect_layers": [0, 1, 2, -1],  # the first three and the last layer
    "pruning.compensate": "reconstruct",  # ridge refit of o_proj / down_proj on calibration activations
    "pruning.ridge": 0.5,
    "pruning.error_feedback": 0.5,  # each refit also corrects half the error earlier layers left
    "distill.steps": 48,  # then 48 steps toward the dense model's predictions on the calibration windows
    "distill.lr": 2e-4,
    "distill.ce_weight": 1.0,  # + the windows' own next-token loss (helps in-domain)
}


def recommended(session: Session | None = None) -> Session:
    """`session` (default: all defaults) with the recommended settings applied."""
    return (session or Session()).with_updates(RECOMMENDED)
