"""taylor_2nd: Taylor importance with the diagonal Fisher term, s = |w·ḡ| + ½·w²·F.

F = (1/B) Σ_b n_b·g_b² (n_b = tokens predicted in batch b for fisher_scale "tokens", 1 for "none"),
the mean of the per-batch *squared* gradients. Group importance: Σ s ("element") or |Σ w·ḡ| +
½·Σ w²·F ("vector"); the first-order part is reported separately (ImportanceResult.first_order).
"""

from __future__ import annotations

from prune_core.importance.methods.spec import MethodSpec
from prune_core.importance.methods.taylor import taylor_scores, taylor_share

SPEC = MethodSpec(
    key="taylor_2nd",
    label="Taylor + Fisher (2nd order)",
    description="+Fisher diag. (mem ≈ prunable fp32) · better at high ratios",
    needs_gradients=True,
    needs_calibration=True,
    needs_fisher=True,
    stats_label="gradient",
    stats_noun="gradient",
    aggregations=("element", "vector"),
    partial=taylor_share,  # type: ignore[arg-type]
    score=taylor_scores,
    cheaper="taylor",
)
