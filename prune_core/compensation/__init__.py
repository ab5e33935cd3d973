"""Compensation after pruning: refit what stays so the pruned model reproduces the original's outputs.

`reconstruct.prune_and_reconstruct` prunes layer by layer and refits each pruned block's output
projection (o_proj / down_proj) by ridge-regularized least squares on calibration activations.
"""

from __future__ import annotations

from prune_core.compensation.reconstruct import BIAS_MODES, DEFAULT_BIAS, prune_and_reconstruct, ridge_refit

__all__ = ["BIAS_MODES", "DEFAULT_BIAS", "prune_and_reconstruct", "ridge_refit"]
