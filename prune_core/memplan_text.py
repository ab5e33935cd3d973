"""`prune plan`'s output: the plan object of memplan.py as plain text (never markup) or as JSON.

Why apart: memplan.py computes the figures; this module only lays them out, so the figures stay
testable as numbers and the layout can change without touching them.
"""

from __future__ import annotations

import json
from typing import Any

from prune_core.memplan import fmt_bytes


def render_text(plan: dict[str, Any]) -> str:
    """The plan as plain text (never markup)."""
    m, s = plan["model"], plan["settings"]
    p = m["parameters"]
    lines = [
        f"memory plan for {m['spec']} ({m['model_type']}, {p['total']:,} parameters; source {m['source']})",
        f"  {m['num_layers']} layers, hidden {m['hidden_size']}, {m['num_heads']} heads / {m['num_kv_heads']} KV heads "
        f"× {m['head_dim']}, MLP {m['intermediate_size']}, vocab {m['vocab_size']}"
        f"{', tied embeddings' if m['tied_embeddings'] else ''}",
        f"  parameters: embeddings {p['embeddings']:,}, attention {p['attention']:,}, MLP {p['mlp']:,}, "
        f"norms {p['norms']:,}, lm_head {p['lm_head']:,}" + (f", other {p['other']:,}" if p["other"] else ""),
        f"  scored by the gradient methods: {m['scored_parameters']:,}",
        f"settings: {s['dtype']}, seq_len {s['seq_len']}, batch_size {s['batch_size']} ({s['tokens_per_batch']:,} "
        f"tokens per batch), gradient_checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"hessian_device {s['hessian_device']}, device {s['device']} (plans against {plan['target']})",
        "",
    ]
    header = ("method", "weights", "gradients", "Σg", "Σn·g²", "other", "act.", "act. ckpt", "peak", "peak ckpt", "fits")
    rows = [header]
    for mp in plan["methods"]:
        b = mp["buffers"]
        fits = mp["fits"]
        key = "with_checkpointing" if s["gradient_checkpointing"] else "without_checkpointing"
        verdict = {True: "yes", False: "no", None: "?"}[fits.get(key)]
        if mp["fisher_on_cpu"]:
            verdict += " (Σn·g² in RAM)"
        rows.append((mp["method"], fmt_bytes(mp["weights"]), fmt_bytes(mp["gradients"]), fmt_bytes(b["grad_sum"]), fmt_bytes(b["fisher"]),
                     fmt_bytes(b["scratch"] + b["input_stats"]), fmt_bytes(mp["activations"]["without_checkpointing"]),
                     fmt_bytes(mp["activations"]["with_checkpointing"]), fmt_bytes(mp["peak"]["without_checkpointing"]),
                     fmt_bytes(mp["peak"]["with_checkpointing"]), verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i in (0, len(r) - 1) else c.rjust(w)
                                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    lines.append("  (act. = activations of one batch incl. the loss head; peak = weights + buffers + the larger of "
                 "activations and gradients; Σn·g² is taylor_2nd's Fisher buffer)")
    r = plan["reconstruct"]
    gram = r["gram"]
    a = r["activations"]
    ef = f", × {a['streams']} with error feedback" if a["streams"] > 1 else ""
    stored = f", stored down_proj inputs/outputs {fmt_bytes(a['stored'])}" if a["stored"] else ""
    recorded = (f"; the dense stream the importance pass records for error feedback "
                f"{fmt_bytes(r['recorded_stream'])}") if r.get("recorded_stream") else ""
    lines += ["", f"reconstruct{' (used by this session)' if r['used'] else ''}: {fmt_bytes(r['total'])} (one float64 "
              f"Gram at a time, {gram['inputs']} inputs ({gram['kept']} kept): {fmt_bytes(gram['total'])}; hidden "
              f"states of {a['windows']} windows: {fmt_bytes(a['stream'])} per stream{ef}, + one layer's outputs"
              f"{stored}{recorded})"]
    gen = plan["generation"]
    if gen["used"]:
        lines.append(f"generation of {gen['windows']} windows: {fmt_bytes(gen['total'])} (key/value cache of a batch "
                     f"of {gen['batch_size']} {fmt_bytes(gen['kv_cache'])}, logits {fmt_bytes(gen['logits'])})")
    d = plan["distill"]
    lines += [f"distill{' (used by this session)' if d['used'] else ''}: {fmt_bytes(d['total'])} (dense teacher "
              f"{fmt_bytes(d['teacher'])}, float32 student {fmt_bytes(d['student'])}, AdamW + gradients "
              f"{fmt_bytes(d['optimizer'])}, logits {fmt_bytes(d['logits'])}, activations {fmt_bytes(d['activations'])}; "
              f"batch {d['batch_size']})"]
    disk = plan["disk"]
    where = (f"; {fmt_bytes(disk['free'])} free under {disk['folder']}" if disk.get("free") is not None else "")
    lines += [f"disk (the results folder holds at most {fmt_bytes(disk['peak'])}{where}): saved model "
              f"{fmt_bytes(disk['saved_model'])}, importance checkpoint {fmt_bytes(disk['importance_checkpoint'])}"
              + (f", distill checkpoint {fmt_bytes(disk['distill_checkpoint'])}" if disk["distill_checkpoint"] else "")
              + " (a checkpoint is written beside the one it replaces)", "", "devices:"]
    for d in plan["devices"]:
        lines.append(f"  {d['device']} ({d['name']}): {fmt_bytes(d['free'])} free of {fmt_bytes(d['total'])}")
    if plan["suggestions"]:
        lines += ["", "short of memory — " + plan["suggestions"][0] + "; try:"]
        lines += [f"  - {t}" for t in plan["suggestions"][1:]]
    else:
        lines += ["", f"{s['method']} fits on {plan['target']} with these settings"]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in plan["assumptions"]]
    return "\n".join(lines)


def to_json(plan: dict[str, Any]) -> str:
    return json.dumps(plan, indent=2, ensure_ascii=False)
