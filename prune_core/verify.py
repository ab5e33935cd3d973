"""Fixes verified before they are recommended: each finding's fix is tried in a what-if and scored by the proxy.

A diagnosis rule knows a symptom (a layer pruned to 99 %, gradient scales 1000× apart) and a remedy
from the seeds, but not whether the remedy helps this model: the seeds' block-wise `log`
normalization multiplies the perplexity of smollm2-135m by 9. So every fix is applied to the session
in a what-if (`pipeline.run(fixed, until="proxy", memo=…)`, which reuses the importance pass) and
the proxy loss with and without it is recorded on the finding; a fix that makes the proxy worse is
kept as "tried and worse" and never recommended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from prune_core.errors import PruneError

SAME = 1e-4  # proxy losses closer than this (nats) count as the same

# Remedies tried when a finding's own (seed) fix makes the proxy worse, in order; the best one that
# beats the current settings becomes the finding's fix. `mean` normalization equalizes block scales
# while keeping every ratio inside a block (allocation/normalize.py).
ALTERNATIVES: dict[str, list[dict[str, Any]]] = {
    "gradient_scale_ratio": [{"normalization.level": "block", "normalization.method": "mean"},
                             {"normalization.level": "layer", "normalization.method": "mean"},
                             {"normalization.level": "block", "normalization.method": "sqrt"}],
    "activation_scale_ratio": [{"normalization.level": "block", "normalization.method": "mean"},
                               {"normalization.level": "layer", "normalization.method": "mean"}],
    "blocks_over_pruned": [{"pruning.max_rate": 0.8}, {"pruning.max_rate": 0.9},
                           {"correction.temperature": 0.25, "correction.tau": 0.0}],
    "early_layers_over_pruned": [{"pruning.early_layers": 3, "pruning.early_max_rate": 0.5},
                                 {"pruning.protect_layers": [0]}],
    "rate_spread": [{"pruning.max_rate": 0.8}, {"pruning.max_rate": 0.9}],
}


def verdict(before: float, after: float) -> str:
    if after < before - SAME:
        return "better"
    if after > before + SAME:
        return "worse"
    return "same"


def verify_findings(findings: Sequence[Any], *, base_loss: float, session: Any,
                    score: Callable[[Any], float | None]) -> list[Any]:
    """Each finding with a fix, scored: `score(fixed_session)` is the proxy loss of the what-if (None:
    could not be tried cheaply, e.g. the fix needs a new importance pass)."""
    out = []
    for f in findings:
        if not f.fix:
            out.append(f)
            continue
        try:
            fixed = session.with_updates(dict(f.fix))
            loss = score(fixed)
        except PruneError:
            loss = None
        if loss is None:
            out.append(replace(f, proxy_before=base_loss, verdict="untested",
                               recommendation=f"{f.recommendation} (not verified: the fix needs a new importance "
                                              "pass)"))
            continue
        v = verdict(base_loss, loss)
        text = f"proxy loss {base_loss:.4f} → {loss:.4f} with this fix"
        if v == "worse":
            alt = _best_alternative(f.issue, session, score, base_loss)
            if alt is not None:
                fix, alt_loss = alt
                keys = ", ".join(f"{k} = {val!r}" for k, val in fix.items())
                rec = (f"set {keys} (proxy loss {base_loss:.4f} → {alt_loss:.4f}); the usual remedy "
                       f"({', '.join(f'{k} = {val!r}' for k, val in f.fix.items())}) was tried and is worse "
                       f"({loss:.4f})")
                out.append(replace(f, fix=fix, proxy_before=base_loss, proxy_after=alt_loss, verdict="better",
                                   recommendation=rec))
                continue
            rec = f"tried and worse: {text}; not recommended (keep the current settings)"
        elif v == "same":
            rec = f"{f.recommendation} ({text}: no measurable change)"
        else:
            rec = f"{f.recommendation} ({text})"
        out.append(replace(f, proxy_before=base_loss, proxy_after=loss, verdict=v, recommendation=rec))
    return out


def _best_alternative(issue: str, session: Any, score: Callable[[Any], float | None],
                      base_loss: float) -> tuple[dict[str, Any], float] | None:
    best: tuple[dict[str, Any], float] | None = None
    for fix in ALTERNATIVES.get(issue, []):
        try:
            loss = score(session.with_updates(dict(fix)))
        except PruneError:
            continue
        if loss is not None and verdict(base_loss, loss) == "better" and (best is None or loss < best[1]):
            best = (dict(fix), loss)
    return best
