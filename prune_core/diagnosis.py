"""Extreme-pruning diagnosis (seed 002): per-layer gradient statistics → findings with one-key fixes.

`diagnose()` looks at the per-layer statistics the importance pass collected (`ImportanceResult.stats`,
gradients for taylor / taylor_2nd, input-activation norms for wanda, weights for magnitude: each
method's `stats_label` in prune_core/importance/registry.py) and at the per-layer pruning
summary of an allocation, and returns `Finding`s sorted by severity (critical first). Each finding
names the numbers that triggered it and carries a `fix`: dotted session keys → values that
`Session.with_updates()` / `prune_core.fixes.apply_fix()` accept.

Rules (thresholds from `[diagnosis]` in the session):
- `nonfinite_<label>` (critical) / `zero_<label>` (high): NaN/Inf or all-zero statistics in a layer;
- `<label>_scale_ratio`: max/min of the per-layer mean |g| of block "layer" (zero/NaN layers ignored)
  above `scale_ratio_warn` → high, above 10× that → critical; fix: block-wise log normalization;
- `long_sequence` (warning): seq_len ≥ 512 together with a large scale ratio (methods that read
  calibration data only); fix: seq_len 256;
- `early_layers_over_pruned` (critical): a block of the first `diagnosis.early_layers` layers pruned
  beyond `extreme_rate`; fix: `pruning.early_layers` / `pruning.early_max_rate` 0.3;
- `blocks_over_pruned`: blocks pruned beyond `extreme_rate` (1 → warning, ≥ 3 or ≥ 10 % → high);
  fix: block correction T=1, tau=0 (or `pruning.max_rate` when the correction is already on);
- `rate_spread` (high): max − min block pruning rate ≥ 0.8; fix: `pruning.max_rate` / `min_rate`;
- `second_order_negligible` (warning): a second-order method (taylor_2nd) whose second-order part is
  < 0.1 % of the total; fix: the method's registered `cheaper` one;
- `no_problems` (info) when nothing else triggers.

`gradient_statistics()` / `gradient_diagnosis()` build the two JSON reports and `write_reports()`
writes them to `<results>/analysis/` atomically (NaN → null).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from prune_core.atomic import write_json
from prune_core.events import FindingEvent, Severity
from prune_core.importance.registry import METHODS, get_method, stats_noun
from prune_core.verify import NOT_RECOMMENDED
from sessions.schema import Session

BLOCKS: tuple[str, ...] = ("attention", "mlp", "layer")
STATS: tuple[str, ...] = ("mean", "std", "norm", "max", "min")
SEVERITY_ORDER: dict[str, int] = {"critical": 0, "high": 1, "warning": 2, "info": 3}
SECOND_ORDER_MIN_SHARE = 1e-3
RATE_SPREAD_HIGH = 0.8
LONG_SEQ_LEN = 512
EARLY_MAX_RATE_FIX = 0.3

Stats = dict[str, dict[str, list[float]]]


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem: what, how bad, the numbers, what to do, and the session keys that do it."""

    issue: str
    severity: Severity
    description: str
    recommendation: str
    fix: dict[str, Any] = field(default_factory=dict)
    # the fix tried in a what-if (prune_core/verify.py): proxy loss without and with it, and the verdict
    proxy_before: float | None = None
    proxy_after: float | None = None
    verdict: str = "untested"  # better | same | worse | smaller (removes less) | untested

    @property
    def recommended(self) -> bool:
        """A fix is recommended unless the proxy showed it makes the model worse."""
        return bool(self.fix) and self.verdict not in NOT_RECOMMENDED

    def to_dict(self) -> dict[str, Any]:
        return _clean({**asdict(self), "recommended": self.recommended})

    def to_event(self) -> FindingEvent:
        return FindingEvent(issue=self.issue, severity=self.severity, description=self.description,
                            recommendation=self.recommendation, fix=dict(self.fix),
                            proxy_before=self.proxy_before, proxy_after=self.proxy_after, verdict=self.verdict)


# ---------------------------------------------------------------------------------------------- helpers


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/Inf → None, numpy scalars → Python numbers, tuples → lists."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _clean(item())
        except (TypeError, ValueError):
            pass
    return value


def _f(value: Any) -> float:
    """A float, NaN for anything missing or unparsable."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def _num(x: float) -> str:
    """Compact number for descriptions: 0.00123 → 1.23e-03, 12.5 → 12.5."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.4g}" if 1e-2 <= abs(x) < 1e4 else f"{x:.2e}"


def _ratio(x: float) -> str:
    return f"{x:,.1f}×" if x < 1e6 else f"{x:.3g}×"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _layer_list(layers: Iterable[int], limit: int = 12) -> str:
    items = sorted(set(int(v) for v in layers))
    shown = ", ".join(str(v) for v in items[:limit])
    if len(items) > limit:
        shown += f", … ({len(items)} in all)"
    return shown


def _noun(label: str) -> str:
    return stats_noun(label)  # the importance-method registry: "gradient", "activation norm", "weight"


def num_layers(stats: Stats) -> int:
    """Layers covered by a statistics dict (the longest list in it)."""
    return max((len(v) for blk in stats.values() for v in blk.values()), default=0)


def _series(stats: Stats, block: str, stat: str, length: int | None = None) -> list[float]:
    values = [_f(v) for v in stats.get(block, {}).get(stat, [])]
    if length is not None and len(values) < length:
        values += [math.nan] * (length - len(values))
    return values


def primary_block(stats: Stats) -> str | None:
    """The block whose statistics describe a whole layer: "layer", else the first one present."""
    for block in ("layer", "mlp", "attention"):
        if stats.get(block):
            return block
    return next(iter(stats), None)


def value_range(values: Sequence[float], absolute: bool = True) -> dict[str, Any]:
    """min / max / ratio of per-layer values, ignoring zero and non-finite layers."""
    vals = [abs(v) if absolute else v for v in (_f(x) for x in values)]
    valid = [(i, v) for i, v in enumerate(vals) if math.isfinite(v) and v > 0]
    ignored = [i for i, v in enumerate(vals) if not (math.isfinite(v) and v > 0)]
    if not valid:
        return {"min": None, "max": None, "min_layer": None, "max_layer": None, "ratio": None,
                "ignored_layers": ignored}
    lo = min(valid, key=lambda t: t[1])
    hi = max(valid, key=lambda t: t[1])
    return {"min": lo[1], "max": hi[1], "min_layer": lo[0], "max_layer": hi[0],
            "ratio": hi[1] / lo[1] if len(valid) >= 2 else None, "ignored_layers": ignored}


def _block_rates(summary: pd.DataFrame | None) -> list[tuple[int, str, float, int, int]]:
    """(layer, block, rate, pruned, groups) for every block with at least one group."""
    rows: list[tuple[int, str, float, int, int]] = []
    if summary is None or len(summary) == 0:
        return rows
    for rec in summary.to_dict("records"):
        layer = int(rec["layer_idx"])
        for block in ("attention", "mlp"):
            groups_v = _f(rec.get(f"{block}_groups"))
            groups = int(groups_v) if math.isfinite(groups_v) else 0
            if groups <= 0:
                continue
            pruned_v = _f(rec.get(f"{block}_pruned"))
            pruned = int(pruned_v) if math.isfinite(pruned_v) else 0
            rate = _f(rec.get(f"{block}_rate"))
            if not math.isfinite(rate):
                rate = pruned / groups
            rows.append((layer, block, rate, pruned, groups))
    return rows


def _format_blocks(blocks: Sequence[tuple[int, str, float, int, int]], limit: int = 10) -> str:
    parts = [f"layer {layer} {block} {_pct(rate)} ({pruned}/{groups})"
             for layer, block, rate, pruned, groups in blocks[:limit]]
    text = ", ".join(parts)
    if len(blocks) > limit:
        text += f", … ({len(blocks)} in all)"
    return text


def _suggest_max_rate(session: Session) -> float:
    """A max_rate well below extreme pruning that still leaves the target ratio reachable."""
    p = session.pruning
    m = max(0.5, round(p.ratio + 0.3, 2))
    m = min(m, 0.95, session.diagnosis.extreme_rate)
    m = max(m, round(p.ratio, 2), p.min_rate)
    return float(min(m, p.max_rate))


def _dtype_fix(session: Session) -> dict[str, Any]:
    return {} if session.model.dtype == "float32" else {"model.dtype": "float32"}


# ---------------------------------------------------------------------------------------------- rules


def _rule_nonfinite_and_zero(stats: Stats, label: str, session: Session) -> list[Finding]:
    noun = _noun(label)
    n = num_layers(stats)
    nonfinite: dict[int, list[str]] = {}
    zero: dict[int, list[str]] = {}
    for block in BLOCKS:
        if block not in stats:
            continue
        cols = {s: _series(stats, block, s, n) for s in STATS if s in stats[block]}
        for layer in range(n):
            vals = [cols[s][layer] for s in cols]
            if any(not math.isfinite(v) for v in vals):
                nonfinite.setdefault(layer, []).append(block)
                continue
            key = "norm" if "norm" in cols else ("mean" if "mean" in cols else None)
            if key is not None and cols[key][layer] == 0 and all(v == 0 for v in vals if v is not None):
                zero.setdefault(layer, []).append(block)
    findings: list[Finding] = []
    dtype = session.model.dtype
    if nonfinite:
        where = "; ".join(f"layer {lay} ({', '.join(b)})" for lay, b in sorted(nonfinite.items())[:12])
        fix = _dtype_fix(session)
        rec = (f"switch the model to float32 (now {dtype}): half precision overflows in the backward pass"
               if fix else "the model gives NaN/Inf even in float32: check its weights and the calibration data "
               "(an empty or binary file), or lower data.seq_len")
        findings.append(Finding(
            issue=f"nonfinite_{label}",
            severity="critical",
            description=(f"NaN or infinite {noun} statistics in {len(nonfinite)} of {n} layers: {where}. "
                         f"Importance in these layers is meaningless, so the ranking is too"),
            recommendation=rec, fix=fix))
    if zero:
        where = "; ".join(f"layer {lay} ({', '.join(b)})" for lay, b in sorted(zero.items())[:12])
        fix = _dtype_fix(session)
        if fix:
            rec = f"switch the model to float32 (now {dtype}): tiny {noun}s underflow to zero in half precision"
        elif label == "activation":
            rec = "check that the calibration data reaches these layers (empty windows, wrong tokenizer)"
        elif label == "weight":
            rec = ("the weights of these layers are zero: check the model file; "
                   "protect them with pruning.protect_layers meanwhile")
        else:
            rec = ("check that the loss reaches these layers (frozen or detached parameters); "
                   "protect them with pruning.protect_layers meanwhile")
        findings.append(Finding(
            issue=f"zero_{label}",
            severity="high",
            description=(f"All-zero {noun} statistics in {len(zero)} of {n} layers: {where}. Their groups all "
                         f"score 0, so the global ranking prunes them first"),
            recommendation=rec, fix=fix))
    return findings


def _rule_scale_ratio(stats: Stats, label: str, session: Session) -> tuple[list[Finding], float | None]:
    block = primary_block(stats)
    if block is None:
        return [], None
    rng = value_range(_series(stats, block, "mean"))
    ratio = rng["ratio"]
    warn = session.diagnosis.scale_ratio_warn
    if ratio is None or ratio <= warn:
        return [], ratio
    noun = _noun(label)
    critical = ratio > 10 * warn
    numbers = (f"Mean |{noun}| differs {_ratio(ratio)} across layers: largest {_num(rng['max'])} in layer "
               f"{rng['max_layer']}, smallest {_num(rng['min'])} in layer {rng['min_layer']} "
               f"(threshold {_ratio(warn)}{', critical above ' + _ratio(10 * warn) if critical else ''})")
    if rng["ignored_layers"]:
        numbers += f"; zero/NaN layers ignored: {_layer_list(rng['ignored_layers'])}"
    norm = session.normalization
    if norm.level == "block":
        return [Finding(
            issue=f"{label}_scale_ratio", severity="info",
            description=numbers + f". Importance is already normalized block-wise ({norm.method}), "
                                  "which compensates for the scale difference",
            recommendation="nothing to do unless blocks are still over-pruned (see the other findings)",
            fix={})], ratio
    if norm.level == "layer":
        return [Finding(
            issue=f"{label}_scale_ratio", severity="warning",
            description=numbers + f". Importance is normalized layer-wise ({norm.method}), which mixes "
                                  "attention and MLP scales",
            recommendation="normalize block-wise instead (attention and MLP of each layer separately)",
            fix={"normalization.level": "block", "normalization.method": "log"})], ratio
    return [Finding(
        issue=f"{label}_scale_ratio", severity="critical" if critical else "high",
        description=numbers + (". Raw importance is not comparable across layers, so the global ranking "
                               "follows the scale instead of the importance"),
        recommendation=("normalize importance block-wise with a log transform before the global ranking "
                        "(normalization.level = \"block\", method = \"log\"); block correction "
                        "(correction.temperature = 1, tau = 0) also helps"),
        fix={"normalization.level": "block", "normalization.method": "log"})], ratio


def _rule_long_sequence(ratio: float | None, label: str, session: Session) -> list[Finding]:
    seq = session.data.seq_len
    warn = session.diagnosis.scale_ratio_warn
    spec = METHODS.get(session.importance.method)
    if ratio is None or ratio <= warn or seq < LONG_SEQ_LEN or (spec is not None and not spec.needs_calibration):
        return []
    return [Finding(
        issue="long_sequence", severity="warning",
        description=(f"Calibration windows are {seq} tokens long and the per-layer mean |{_noun(label)}| "
                     f"differs {_ratio(ratio)} (threshold {_ratio(warn)}); longer windows tend to widen "
                     "the gap between layers"),
        recommendation="try data.seq_len = 256 (or 128) and compare the per-layer rates",
        fix={"data.seq_len": 256})]


def _rule_early_layers(rates: list[tuple[int, str, float, int, int]], session: Session,
                       n_layers: int) -> list[Finding]:
    extreme = session.diagnosis.extreme_rate
    # never name more layers than the model has (pruning.early_layers beyond it is a session error)
    n_early = min(session.diagnosis.early_layers, n_layers) if n_layers else session.diagnosis.early_layers
    if n_early <= 0 or not rates:
        return []
    hit = [r for r in rates if r[0] < n_early and r[2] > extreme]
    if not hit:
        return []
    layers = sorted({r[0] for r in hit})
    early_max = min(EARLY_MAX_RATE_FIX, session.pruning.early_max_rate)
    current = min(session.pruning.early_layers, n_layers) if n_layers else session.pruning.early_layers
    fix: dict[str, Any] = {"pruning.early_layers": max(n_early, current),
                           "pruning.early_max_rate": early_max}
    return [Finding(
        issue="early_layers_over_pruned", severity="critical",
        description=(f"{len(layers)} of the first {n_early} layers {'has' if len(layers) == 1 else 'have'} "
                     f"blocks pruned beyond "
                     f"{_pct(extreme)}: {_format_blocks(hit)}"),
        recommendation=(f"the first layers are usually the most important: cap them with "
                        f"pruning.early_layers = {fix['pruning.early_layers']} and "
                        f"early_max_rate = {early_max} (or protect them with pruning.protect_layers)"),
        fix=fix)]


def _rule_over_pruned(rates: list[tuple[int, str, float, int, int]], session: Session) -> list[Finding]:
    extreme = session.diagnosis.extreme_rate
    hit = sorted((r for r in rates if r[2] > extreme), key=lambda r: (-r[2], r[0], r[1]))
    if not hit:
        return []
    total = len(rates)
    high = len(hit) >= 3 or len(hit) >= 0.1 * total
    if session.correction.temperature == 0:
        fix: dict[str, Any] = {"correction.temperature": 1.0, "correction.tau": 0.0}
        rec = ("turn on block-level correction (correction.temperature = 1, tau = 0): it rescales each "
               "block's importance by its measured loss impact; or cap blocks with pruning.max_rate")
    else:
        cap = _suggest_max_rate(session)
        fix = {"pruning.max_rate": cap}
        rec = f"cap every block's pruned fraction with pruning.max_rate = {cap}"
    return [Finding(
        issue="blocks_over_pruned", severity="high" if high else "warning",
        description=(f"{len(hit)} of {total} blocks ({_pct(len(hit) / total)}) are pruned beyond "
                     f"{_pct(extreme)}: {_format_blocks(hit)}"),
        recommendation=rec, fix=fix)]


def _rule_rate_spread(rates: list[tuple[int, str, float, int, int]], session: Session) -> list[Finding]:
    n = max((r[0] + 1 for r in rates), default=0)
    protected = {i if i >= 0 else n + i for i in session.pruning.protect_layers}
    blocks = session.pruning.budget()[0]
    skipped = {"attention"} if blocks == "mlp" else {"mlp"} if blocks == "attention" else set()
    usable = [r for r in rates if r[0] not in protected and r[1] not in skipped and math.isfinite(r[2])]
    if len(usable) < 2:
        return []
    lo = min(usable, key=lambda r: (r[2], r[0]))
    hi = max(usable, key=lambda r: (r[2], -r[0]))
    spread = hi[2] - lo[2]
    if spread < RATE_SPREAD_HIGH:
        return []
    cap = _suggest_max_rate(session)
    fix: dict[str, Any] = {"pruning.max_rate": cap}
    floor = round(min(0.1, session.pruning.ratio / 4), 2)
    if floor > session.pruning.min_rate and lo[2] < floor and floor <= cap:
        fix["pruning.min_rate"] = floor
    return [Finding(
        issue="rate_spread", severity="high",
        description=(f"Block pruning rates range from {_pct(lo[2])} (layer {lo[0]} {lo[1]}) to {_pct(hi[2])} "
                     f"(layer {hi[0]} {hi[1]}): a spread of {100 * spread:.1f} points "
                     f"(threshold {100 * RATE_SPREAD_HIGH:.0f})"),
        recommendation=("bound the per-block rates: "
                        + ", ".join(f"{k} = {v}" for k, v in fix.items())
                        + "; normalization or block correction attack the cause"),
        fix=fix)]


def _rule_second_order(share: float | None, session: Session) -> list[Finding]:
    if share is None or not math.isfinite(share) or share >= SECOND_ORDER_MIN_SHARE:
        return []
    method = session.importance.method
    cheaper = get_method(method).cheaper or "taylor"  # the registry names the first-order method
    if session.importance.fisher_scale == "none":
        fix: dict[str, Any] = {"importance.fisher_scale": "tokens"}
        rec = (f"the second-order pass changes nothing; use {cheaper} (cheaper) or fisher_scale=tokens "
               "(scale the Fisher diagonal by the token count)")
    else:
        fix = {"importance.method": cheaper}
        rec = f"the second-order pass changes nothing; use {cheaper} (cheaper) or fisher_scale=tokens"
    return [Finding(
        issue="second_order_negligible", severity="warning",
        description=(f"The second-order term is {share:.2e} of the total importance ({100 * share:.4f}%, "
                     f"threshold {100 * SECOND_ORDER_MIN_SHARE:.1f}%), with method={method} and "
                     f"fisher_scale={session.importance.fisher_scale}"),
        recommendation=rec, fix=fix)]


def diagnose(*, stats: Stats, stats_label: str, summary: pd.DataFrame | None, session: Session,
             second_order_share: float | None = None) -> list[Finding]:
    """Every finding for one run, sorted by severity (critical first, rule order within a severity)."""
    label = stats_label or "gradient"
    stats = stats or {}
    findings: list[Finding] = []
    findings += _rule_nonfinite_and_zero(stats, label, session)
    scale, ratio = _rule_scale_ratio(stats, label, session)
    rates = _block_rates(summary)
    n_layers = max(num_layers(stats), max((r[0] + 1 for r in rates), default=0))
    if summary is not None and len(summary):
        n_layers = max(n_layers, len(summary))
    findings += _rule_early_layers(rates, session, n_layers)
    findings += scale
    findings += _rule_over_pruned(rates, session)
    findings += _rule_rate_spread(rates, session)
    findings += _rule_long_sequence(ratio, label, session)
    findings += _rule_second_order(second_order_share, session)
    if not [f for f in findings if f.severity != "info"]:
        top = max((r[2] for r in rates), default=math.nan)
        parts = []
        if ratio is not None:
            parts.append(f"per-layer mean |{_noun(label)}| ratio {_ratio(ratio)} "
                         f"(threshold {_ratio(session.diagnosis.scale_ratio_warn)})")
        if math.isfinite(top):
            parts.append(f"highest block rate {_pct(top)} (extreme above {_pct(session.diagnosis.extreme_rate)})")
        findings.append(Finding(
            issue="no_problems", severity="info",
            description="No extreme pruning found" + (": " + "; ".join(parts) if parts else ""),
            recommendation="nothing to do", fix={}))
    return sorted(findings, key=lambda f: SEVERITY_ORDER.get(f.severity, 9))


def second_order_share(first_order_total: float, total: float) -> float | None:
    """(Σ total − Σ first order) / Σ total, the share `diagnose()` expects for taylor_2nd."""
    if not math.isfinite(total) or total == 0 or not math.isfinite(first_order_total):
        return None
    return max(0.0, (total - first_order_total) / total)


# ---------------------------------------------------------------------------------------------- reports


def gradient_statistics(stats: Stats, stats_label: str = "gradient") -> dict[str, Any]:
    """The gradient_statistics.json content: per layer and block, plus cross-layer ranges and ratios."""
    n = num_layers(stats)
    blocks = [b for b in BLOCKS if b in stats] + [b for b in stats if b not in BLOCKS]
    layers = []
    for layer in range(n):
        row: dict[str, Any] = {"layer": layer}
        for block in blocks:
            row[block] = {s: _series(stats, block, s, n)[layer] for s in stats[block]}
        layers.append(row)
    ratios = {block: {s: value_range(_series(stats, block, s)) for s in ("mean", "norm") if s in stats[block]}
              for block in blocks}
    out: dict[str, Any] = {
        "label": stats_label,
        "num_layers": n,
        "primary_block": primary_block(stats),
        "layers": layers,
        "ratios": ratios,
        "blocks": {block: {s: _series(stats, block, s, n) for s in stats[block]} for block in blocks},
    }
    prim = out["primary_block"]
    if prim is not None:
        for s in ("mean", "norm"):
            r = ratios[prim].get(s)
            if r is not None:
                out[f"{s}_range"] = [r["min"], r["max"]]
                out[f"{s}_ratio"] = r["ratio"]
    return _clean(out)


def stats_from_statistics(doc: dict[str, Any]) -> tuple[Stats, str]:
    """Inverse of `gradient_statistics()` for the charts: (stats with None → NaN, label)."""
    blocks = doc.get("blocks") or {}
    stats = {b: {s: [_f(v) for v in vals] for s, vals in sv.items()} for b, sv in blocks.items()}
    return stats, str(doc.get("label") or "gradient")


def _importance_of(table: pd.DataFrame | None, layer: int, block: str) -> dict[str, Any]:
    if table is None or len(table) == 0:
        return {}
    rows = table[(table["layer_idx"] == layer) & (table["group_type"] == block)]
    out: dict[str, Any] = {"groups": len(rows)}
    for col, key in (("importance", "importance"), ("raw_importance", "raw_importance")):
        if col in rows:
            vals = pd.to_numeric(rows[col], errors="coerce")
            out[f"{key}_total"] = float(vals.sum()) if len(vals) else None
            out[f"{key}_mean"] = float(vals.mean()) if len(vals) else None
    if "pruned" in rows and "importance" in rows and len(rows):
        mask = rows["pruned"].astype(bool)
        kept = pd.to_numeric(rows.loc[~mask, "importance"], errors="coerce")
        gone = pd.to_numeric(rows.loc[mask, "importance"], errors="coerce")
        out["pruned_importance_mean"] = float(gone.mean()) if len(gone) else None
        out["kept_importance_mean"] = float(kept.mean()) if len(kept) else None
    return out


def gradient_diagnosis(findings: Sequence[Finding], stats: Stats, summary: pd.DataFrame | None,
                       table: pd.DataFrame | None, session: Session, *,
                       stats_label: str = "gradient") -> dict[str, Any]:
    """The gradient_diagnosis.json content: extreme blocks with their statistics, ratios, findings."""
    extreme = session.diagnosis.extreme_rate
    n = num_layers(stats)
    extreme_layers = []
    for layer, block, rate, pruned, groups in sorted(_block_rates(summary), key=lambda r: (r[0], r[1])):
        if rate <= extreme:
            continue
        entry: dict[str, Any] = {"layer": layer, "block": block, "rate": rate, "pruned": pruned, "groups": groups}
        entry[stats_label] = {
            b: {s: _series(stats, b, s, n)[layer] for s in stats[b]}
            for b in (block, "layer") if b in stats and layer < n
        }
        entry["importance"] = _importance_of(table, layer, block)
        extreme_layers.append(entry)
    stat_doc = gradient_statistics(stats, stats_label)
    rates = _block_rates(summary)
    out: dict[str, Any] = {
        "label": stats_label,
        "thresholds": {"extreme_rate": extreme, "scale_ratio_warn": session.diagnosis.scale_ratio_warn,
                       "early_layers": session.diagnosis.early_layers},
        "num_layers": n or (len(summary) if summary is not None else 0),
        "extreme_layers": extreme_layers,
        "mean_range": stat_doc.get("mean_range"),
        "mean_ratio": stat_doc.get("mean_ratio"),
        "norm_range": stat_doc.get("norm_range"),
        "norm_ratio": stat_doc.get("norm_ratio"),
        "ratios": stat_doc["ratios"],
        "rate_range": ([min(r[2] for r in rates), max(r[2] for r in rates)] if rates else None),
        "severity": findings[0].severity if findings else "info",
        "diagnosis": [f.to_dict() for f in findings],
    }
    return _clean(out)


def write_reports(folder: Path, *, findings: Sequence[Finding], stats: Stats, stats_label: str,
                  summary: pd.DataFrame | None, table: pd.DataFrame | None,
                  session: Session) -> dict[str, Path]:
    """Write gradient_statistics.json and gradient_diagnosis.json into `<folder>/analysis/`.

    `folder` is the results folder; a folder already named `analysis` is used as is.
    """
    folder = Path(folder)
    analysis = folder if folder.name == "analysis" else folder / "analysis"
    paths = {"gradient_statistics": analysis / "gradient_statistics.json",
             "gradient_diagnosis": analysis / "gradient_diagnosis.json"}
    write_json(paths["gradient_statistics"], gradient_statistics(stats, stats_label))
    write_json(paths["gradient_diagnosis"],
               gradient_diagnosis(findings, stats, summary, table, session, stats_label=stats_label))
    return paths


def findings_from_dicts(items: Iterable[dict[str, Any]]) -> list[Finding]:
    """Findings back from gradient_diagnosis.json's `diagnosis` list (for `prune fix` / the TUI)."""
    out = []
    for d in items:
        sev = d.get("severity", "info")
        out.append(Finding(issue=str(d.get("issue", "")), severity=sev if sev in SEVERITY_ORDER else "info",
                           description=str(d.get("description", "")),
                           recommendation=str(d.get("recommendation", "")), fix=dict(d.get("fix") or {}),
                           proxy_before=d.get("proxy_before"), proxy_after=d.get("proxy_after"),
                           verdict=str(d.get("verdict", "untested"))))
    return out
