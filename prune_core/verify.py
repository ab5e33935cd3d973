"""Fixes verified before they are recommended: each finding's fix is tried in a what-if and scored by the proxy.

A diagnosis rule knows a symptom (a layer pruned to 99 %, gradient scales 1000× apart) and a remedy
from the seeds, but not whether the remedy helps this model: the seeds' block-wise `log`
normalization multiplies the perplexity of smollm2-135m by 9. So every fix is applied to the session
in a what-if (`pipeline.run(fixed, until="proxy", memo=…)`, which reuses the importance pass) and
the proxy loss with and without it is recorded on the finding; a fix that makes the proxy worse is
kept as "tried and worse" and never recommended.

Like for like: a fix that removes less than the session asks (an early-layer cap that leaves a 60 %
target at 15 %) lowers the proxy because less is cut, not because the cut is better. Its verdict is
"smaller" (achieved ratio below the current one by more than `RATIO_SLACK`), it is never recommended,
and the alternatives are tried instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from prune_core.errors import PruneError

SAME = 1e-4  # proxy losses closer than this (nats) count as the same
RATIO_SLACK = 0.01  # a fix may remove up to 1 point less than the current allocation and still compare
NOT_RECOMMENDED = ("worse", "smaller")  # verdicts whose fix is shown as tried, never offered
# why a fix with a NOT_RECOMMENDED verdict is not offered, in the words every front end uses
WHY_NOT: dict[str, str] = {"worse": "made the proxy loss worse", "smaller": "removes less than the session asks"}


def why_not(verdict: str | None) -> str:
    """The reason a fix with this verdict is not recommended (WHY_NOT; "worse" for anything else)."""
    return WHY_NOT.get(verdict or "", WHY_NOT["worse"])


class Trial(NamedTuple):
    """What a what-if of a fixed session measured: its proxy loss and the ratio it achieved."""

    loss: float
    achieved: float | None = None

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


def smaller(trial: Trial, base_achieved: float | None) -> bool:
    """The fixed allocation removes noticeably less than the current one (not a like-for-like score)."""
    return (base_achieved is not None and trial.achieved is not None
            and trial.achieved < base_achieved - RATIO_SLACK)


def verify_findings(findings: Sequence[Any], *, base_loss: float, session: Any,
                    score: Callable[[Any], Trial | None], base_achieved: float | None = None) -> list[Any]:
    """Each finding with a fix, scored: `score(fixed_session)` is the what-if's proxy loss and achieved
    ratio (None: could not be tried cheaply, e.g. the fix needs a new importance pass); `base_achieved`
    is the current allocation's ratio."""
    out = []
    for f in findings:
        if not f.fix:
            out.append(f)
            continue
        try:
            fixed = session.with_updates(dict(f.fix))
            trial = score(fixed)
        except PruneError:
            trial = None
        if trial is None:
            out.append(replace(f, proxy_before=base_loss, verdict="untested",
                               recommendation=f"{f.recommendation} (not verified: the fix needs a new importance "
                                              "pass)"))
            continue
        loss = trial.loss
        v = verdict(base_loss, loss)
        if v != "worse" and smaller(trial, base_achieved):
            v = "smaller"  # a lower loss for cutting less: not like for like
        text = f"proxy loss {base_loss:.4f} → {loss:.4f} with this fix"
        if v in NOT_RECOMMENDED:
            alt = _best_alternative(f.issue, session, score, base_loss, base_achieved)
            if alt is not None:
                fix, alt_loss = alt
                keys = ", ".join(f"{k} = {val!r}" for k, val in fix.items())
                why = (f"removes only {trial.achieved:.1%} instead of {base_achieved:.1%}" if v == "smaller"
                       else "is worse")
                rec = (f"set {keys} (proxy loss {base_loss:.4f} → {alt_loss:.4f}); the usual remedy "
                       f"({', '.join(f'{k} = {val!r}' for k, val in f.fix.items())}) was tried and {why} "
                       f"({loss:.4f})")
                out.append(replace(f, fix=fix, proxy_before=base_loss, proxy_after=alt_loss, verdict="better",
                                   recommendation=rec))
                continue
            if v == "smaller":
                rec = (f"tried and not comparable: {text}, but it removes only {trial.achieved:.1%} instead of "
                       f"{base_achieved:.1%}, so the lower loss comes from cutting less; not recommended (lower "
                       "pruning.ratio if a smaller cut is what you want)")
            else:
                rec = f"tried and worse: {text}; not recommended (keep the current settings)"
        elif v == "same":
            rec = f"{f.recommendation} ({text}: no measurable change)"
        else:
            rec = f"{f.recommendation} ({text})"
        out.append(replace(f, proxy_before=base_loss, proxy_after=loss, verdict=v, recommendation=rec))
    return out


def _best_alternative(issue: str, session: Any, score: Callable[[Any], Trial | None], base_loss: float,
                      base_achieved: float | None) -> tuple[dict[str, Any], float] | None:
    best: tuple[dict[str, Any], float] | None = None
    for fix in ALTERNATIVES.get(issue, []):
        try:
            trial = score(session.with_updates(dict(fix)))
        except PruneError:
            continue
        if trial is None or smaller(trial, base_achieved):
            continue
        if verdict(base_loss, trial.loss) == "better" and (best is None or trial.loss < best[1]):
            best = (dict(fix), trial.loss)
    return best
