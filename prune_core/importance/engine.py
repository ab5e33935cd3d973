"""run_importance: the importance pass (taylor, taylor_2nd, wanda) with live stats and resume.

THE CONTRACT
Batches are consecutive `batch_size` rows of the calibration tokens [N, S], in order; the last
batch is smaller when N % batch_size != 0. For batch b (rows_b rows):
    loss_b = mean next-token cross-entropy over the batch = model(ids, labels=ids).loss
    g_b    = ∇ loss_b, computed fresh (gradients set to None before every backward)
    n_b    = tokens predicted in batch b = rows_b × (S − 1)  (fisher_scale "tokens"), 1 ("none")
Over B batches:
    mean gradient  ḡ = (1/B) Σ_b g_b
    Fisher diag    F = (1/B) Σ_b n_b · g_b²      (= (n/B) Σ_b g_b² when all batches have n tokens)
Element scores: taylor s = |w·ḡ|;  taylor_2nd s = |w·ḡ| + 0.5·w²·F.
Group importance: aggregation "element" = Σ s over the group's parameters; "vector" = |Σ w·ḡ|
(+ 0.5·Σ w²·F for taylor_2nd). Group parameters (adapters/base.py): attention group k = KV head k:
k/v rows + the q rows of its r query heads + the same o_proj columns, plus q/k/v biases where
present (Qwen2); MLP channel j = gate/up row j (+ biases) + down_proj column j.
wanda: forward passes only (no_grad). For every prunable linear, per input feature j,
‖X_j‖₂ = sqrt(Σ_tokens x_j²) over all calibration tokens (forward pre-hooks, O(features) memory).
Element score |W_ij|·‖X_j‖₂; group importance = Σ over the group's weight elements (q/k/v/gate/up
rows use their own input norms, o_proj/down_proj columns theirs); biases are not scored.
Every pass also sums the inputs of o_proj and down_proj over all tokens (input_sums, input_tokens)
for FLAP-style bias compensation. All accumulators are plain sums (Σg, Σn·g², Σx², Σx, counts),
divided only when the result is produced, so a data-parallel all-reduce can be added later.

Live statistics (stats.py) go out in a BatchDone event after every batch; the pass checkpoints to
`checkpoint_dir` (state.py) every `checkpoint_seconds` (0 = every batch), when should_stop() turns
true (then raises Interrupted) and when a batch fails with NaN/Inf (then raises RunFailed naming
the batch and module; the checkpoint holds everything accumulated before that batch). A checkpoint
with the same identity is resumed from its batch; one with a different identity is refused. After
a successful pass the checkpoint is deleted (the caller caches the ImportanceResult).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_core.adapters.base import Adapter, LayerParts
from prune_core.errors import BadInput, Interrupted, RunFailed
from prune_core.events import BatchDone, Checkpointed, EventSink, LayerStats, Notice, StageDone, StageStarted
from prune_core.importance.accumulate import GradientAccumulator, NonFiniteGradient
from prune_core.importance.groups import Target, prunable_targets, taylor_group_scores, wanda_group_scores
from prune_core.importance.hooks import InputHooks
from prune_core.importance.nonfinite import locate_nonfinite
from prune_core.importance.prepare import prepared
from prune_core.importance.result import ImportanceResult
from prune_core.importance.state import CheckpointStore
from prune_core.importance.stats import BlockStats, aggregate

METHODS = ("taylor", "taylor_2nd", "wanda")
AGGREGATIONS = ("element", "vector")
FISHER_SCALES = ("tokens", "none")
HESSIAN_DEVICES = ("auto", "cpu", "device")
ENGINE_VERSION = 1
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
NAN_FIX = (
    'load the model in float32 (dtype = "float32") or use shorter sequences (seq_len); '
    "if a weight itself is NaN/Inf the model file is damaged"
)


def batch_slices(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the batches: consecutive, in order, the last one possibly smaller."""
    return [(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]


def tokens_sha256(tokens: torch.Tensor) -> str:
    """sha256 of the token ids as int64 little-endian bytes (same as data.token_fingerprint)."""
    data = tokens.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False)
    return hashlib.sha256(data.tobytes()).hexdigest()


def _targets_digest(targets: Sequence[Target]) -> tuple[str, str]:
    """(sha256 of names/shapes/dtypes, sha256 of the first 64 values of every scored parameter)."""
    layout, sample = hashlib.sha256(), hashlib.sha256()
    for t in targets:
        layout.update(f"{t.key}:{tuple(t.param.shape)}:{t.param.dtype};".encode())
        head = t.param.detach().reshape(-1)[:64].to("cpu", torch.float64).contiguous()
        sample.update(head.numpy().tobytes())
    return layout.hexdigest(), sample.hexdigest()


def _validate(
    tokens: torch.Tensor,
    method: str,
    aggregation: str,
    fisher_scale: str,
    batch_size: int,
    hessian_device: str,
    checkpoint_seconds: float,
) -> None:
    def bad(what: str, fix: str) -> BadInput:
        return BadInput(what, fix)

    if method not in METHODS:
        raise bad(f"unknown importance method {method!r}", f"use one of {', '.join(METHODS)}")
    if aggregation not in AGGREGATIONS:
        raise bad(f"unknown aggregation {aggregation!r}", f"use one of {', '.join(AGGREGATIONS)}")
    if fisher_scale not in FISHER_SCALES:
        raise bad(f"unknown fisher_scale {fisher_scale!r}", f"use one of {', '.join(FISHER_SCALES)}")
    if hessian_device not in HESSIAN_DEVICES:
        raise bad(f"unknown hessian_device {hessian_device!r}", f"use one of {', '.join(HESSIAN_DEVICES)}")
    if batch_size < 1:
        raise bad(f"batch_size must be at least 1 (got {batch_size})", "set batch_size >= 1")
    if checkpoint_seconds < 0:
        raise bad("checkpoint_seconds must be >= 0", "use 0 to checkpoint after every batch")
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex():
        raise bad(
            f"calibration tokens must be an integer tensor [samples, seq_len] (got {tuple(tokens.shape)}, {tokens.dtype})",
            "pass the output of data.calibration_tokens",
        )
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise bad(
            f"need at least 1 calibration sample of at least 2 tokens (got {tuple(tokens.shape)})",
            "raise num_samples / seq_len",
        )


def _choose_hessian_device(
    choice: str, device: torch.device, nbytes: int, emit: EventSink, stage: str
) -> torch.device:
    if choice == "cpu" or device.type == "cpu":
        return torch.device("cpu")
    if choice == "device":
        return device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if free < 1.5 * nbytes + 2**30:
            emit(
                Notice(
                    f"keeping the Fisher diagonal ({nbytes / 2**30:.1f} GiB) on the CPU: "
                    f"only {free / 2**30:.1f} GiB free on {device}",
                    stage=stage,
                )
            )
            return torch.device("cpu")
    return device


@dataclass
class _Progress:
    """What a checkpoint keeps besides the sums."""

    next_batch: int = 0
    batch_stats: list[dict[str, Any]] = field(default_factory=list)
    seconds_before: float = 0.0
    resumed_from: int = 0

    @property
    def losses(self) -> list[float]:
        return [b["loss"] for b in self.batch_stats]


def run_importance(
    model: nn.Module,
    adapter: Adapter,
    tokens: torch.LongTensor,
    *,
    method: str,
    aggregation: str = "element",
    fisher_scale: str = "tokens",
    batch_size: int,
    hessian_device: str = "auto",
    gradient_checkpointing: bool = False,
    checkpoint_dir: Path | None = None,
    checkpoint_seconds: float = 60.0,
    identity: dict | None = None,
    on_event: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
    stage: str = "importance",
) -> ImportanceResult:
    """Run the importance pass over `tokens` and return group importance (see module docstring).

    should_stop() is polled after every batch but the last; when true the pass checkpoints (if
    checkpoint_dir is set) and raises errors.Interrupted. identity (model fingerprint, data
    fingerprint, ...) is stored in the checkpoint together with the engine's own (method, batch
    size, token sha256, parameter layout); a checkpoint whose identity differs is refused (BadInput).
    """
    emit: EventSink = on_event or (lambda event: None)
    _validate(tokens, method, aggregation, fisher_scale, batch_size, hessian_device, checkpoint_seconds)
    grad_pass = method != "wanda"
    if not grad_pass and aggregation == "vector":
        emit(
            Notice("wanda scores are always summed per element; aggregation 'vector' is ignored", stage=stage)
        )
        aggregation = "element"
    if not grad_pass and gradient_checkpointing:
        emit(Notice("gradient checkpointing is ignored by wanda (no backward pass)", stage=stage))

    parts = adapter.all_parts(model)
    targets = prunable_targets(parts)
    device = targets[0].param.device
    num_samples, seq_len = int(tokens.shape[0]), int(tokens.shape[1])
    slices = batch_slices(num_samples, batch_size)
    total = len(slices)
    layout, sample = _targets_digest(targets)
    full_identity = {
        "engine": {
            "version": ENGINE_VERSION,
            "method": method,
            "fisher_scale": fisher_scale if method == "taylor_2nd" else None,
            "batch_size": batch_size,
            "num_samples": num_samples,
            "seq_len": seq_len,
            "tokens_sha256": tokens_sha256(tokens),
            "parameters_sha256": layout,
            "weights_sample_sha256": sample,
        },
        "caller": identity or {},
    }
    store = CheckpointStore(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    param_dtype = targets[0].param.dtype
    if param_dtype in (torch.float16, torch.bfloat16):
        emit(
            Notice(
                f"model is {str(param_dtype).removeprefix('torch.')}: sums are kept in float32", "info", stage
            )
        )

    emit(
        StageStarted(
            stage, f"{method} importance: {num_samples}×{seq_len} tokens, batch size {batch_size}", total
        )
    )
    with ExitStack() as stack:
        stack.enter_context(
            prepared(
                model,
                grad_params=[t.param for t in targets] if grad_pass else None,
                layers=list(adapter.layers(model)),
                gradient_checkpointing=gradient_checkpointing and grad_pass,
            )
        )
        inputs = stack.enter_context(InputHooks(parts, squares=not grad_pass))
        acc: GradientAccumulator | None = None
        if grad_pass:
            nbytes = sum(t.param.numel() for t in targets) * 4
            hdev = (
                _choose_hessian_device(hessian_device, device, nbytes, emit, stage)
                if method == "taylor_2nd"
                else device
            )
            acc = stack.enter_context(
                GradientAccumulator(
                    [(t.key, t.param) for t in targets],
                    second_order=method == "taylor_2nd",
                    hessian_device=hdev,
                )
            )
            plan = BlockStats([(t.layer, t.block) for t in targets], len(parts))
        else:
            plan = BlockStats(inputs.owners(), len(parts))

        progress = _Progress()
        if store is not None:
            ckpt = store.load()
            if ckpt is not None:
                store.check_identity(ckpt.meta.get("identity", {}), full_identity)
                progress = _Progress(
                    next_batch=int(ckpt.meta["next_batch"]),
                    batch_stats=list(ckpt.meta["batch_stats"]),
                    seconds_before=float(ckpt.meta["seconds"]),
                    resumed_from=int(ckpt.meta["next_batch"]),
                )
                if acc is not None:
                    acc.load_state_tensors(ckpt.tensors, progress.next_batch)
                inputs.load_state_tensors(ckpt.tensors, int(ckpt.meta["input_tokens"]))
                del ckpt
                emit(Notice(f"resuming from batch {progress.next_batch}/{total}", "info", stage))

        def save_checkpoint(next_batch: int, elapsed: float) -> None:
            if store is None:
                return
            tensors = {**(acc.state_tensors() if acc is not None else {}), **inputs.state_tensors()}
            meta = {
                "identity": full_identity,
                "next_batch": next_batch,
                "total_batches": total,
                "method": method,
                "batch_stats": progress.batch_stats[:next_batch],
                "input_tokens": inputs.tokens,
                "seconds": progress.seconds_before + elapsed,
            }
            path = store.save(meta, tensors)
            emit(Checkpointed(stage, next_batch, str(path.parent)))

        started = last_checkpoint = time.perf_counter()
        session_tokens = 0
        for b in range(progress.next_batch, total):
            lo, hi = slices[b]
            ids = tokens[lo:hi].to(device=device, dtype=torch.long)
            rows = hi - lo
            where: str | None = None
            failed = False
            inputs.begin_batch()
            try:
                if acc is not None:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    inputs.end_forward()
                    if acc.streaming and not math.isfinite(float(loss.detach())):
                        failed = True
                    else:
                        weight = rows * (seq_len - 1) if fisher_scale == "tokens" else 1.0
                        stat_rows, counts = acc.accumulate(loss, weight=weight), acc.counts
                else:
                    with torch.no_grad():
                        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                    inputs.end_forward()
                    stat_rows, counts = inputs.rows.tolist(), inputs.counts
                loss_value = float(loss.detach())
                failed = failed or not math.isfinite(loss_value)
                if not failed:
                    where = inputs.first_nonfinite()
                    failed = where is not None
            except NonFiniteGradient as exc:
                # a NaN loss makes every gradient NaN: then the forward pass is the place to look
                failed, where = True, (f"gradient of {exc.key}" if math.isfinite(float(loss.detach())) else None)
            except RuntimeError as exc:
                if isinstance(exc, _OOM) or "out of memory" in str(exc).lower():
                    raise RunFailed(
                        f"out of memory in batch {b + 1}/{total} of the importance pass",
                        'lower batch_size or seq_len, enable gradient_checkpointing, or set hessian_device = "cpu"',
                    ) from exc
                if "used twice" in str(exc) or "two gradients" in str(exc):
                    raise RunFailed(str(exc), "use a supported model family") from exc
                raise
            finally:
                inputs.end_forward()
            loss = None  # free the graph's last reference before the next batch
            if failed:
                cause = where or locate_nonfinite(model, ids) or "the loss"
                save_checkpoint(b, time.perf_counter() - started)
                kept = (
                    f"; batches 1–{b} are checkpointed in {store.folder}" if store is not None and b else ""
                )
                raise RunFailed(
                    f"NaN/Inf in batch {b + 1}/{total} of the {method} pass ({cause}){kept}", NAN_FIX
                )

            inputs.commit(rows * seq_len)
            layer_stats: LayerStats = plan.combine(stat_rows, counts)
            progress.batch_stats.append({"loss": loss_value, "tokens": rows * seq_len, "stats": layer_stats})
            session_tokens += rows * seq_len
            now = time.perf_counter()
            elapsed = now - started
            done_here = b + 1 - progress.resumed_from
            losses = progress.losses
            emit(
                BatchDone(
                    stage=stage,
                    batch=b + 1,
                    total=total,
                    loss=loss_value,
                    mean_loss=sum(losses) / len(losses),
                    tokens_per_s=session_tokens / elapsed if elapsed > 0 else 0.0,
                    eta_s=(total - b - 1) * elapsed / done_here,
                    layer_stats=layer_stats,
                    stats_label="gradient" if grad_pass else "activation",
                    resumed_from=progress.resumed_from,
                )
            )
            if b + 1 < total:
                stop = bool(should_stop()) if should_stop is not None else False
                if stop or (store is not None and now - last_checkpoint >= checkpoint_seconds):
                    save_checkpoint(b + 1, elapsed)
                    last_checkpoint = time.perf_counter()
                if stop:
                    where_kept = (
                        f"progress is checkpointed in {store.folder}"
                        if store is not None
                        else "no checkpoint_dir was given, so progress is not kept"
                    )
                    raise Interrupted(
                        f"importance pass stopped after batch {b + 1}/{total}; {where_kept}",
                        "run again with the same settings to resume" if store is not None else None,
                    )

        seconds = progress.seconds_before + (time.perf_counter() - started)
        result = _build_result(
            parts=parts,
            targets=targets,
            acc=acc,
            inputs=inputs,
            method=method,
            aggregation=aggregation,
            fisher_scale=fisher_scale,
            progress=progress,
            total=total,
            seconds=seconds,
            metadata={
                "engine_version": ENGINE_VERSION,
                "identity": full_identity,
                "batch_size": batch_size,
                "num_samples": num_samples,
                "seq_len": seq_len,
                "dtype": str(param_dtype).removeprefix("torch."),
                "device": str(device),
                "hessian_device": str(acc.hessian_device) if acc is not None and acc.second_order else None,
                "gradient_checkpointing": bool(gradient_checkpointing and grad_pass),
                "resumed_from": progress.resumed_from,
            },
        )
    if store is not None:
        store.clear()
    losses = progress.losses
    emit(StageDone(stage, seconds, summary=f"{total} batches, mean loss {sum(losses) / len(losses):.4f}"))
    return result


def _build_result(
    *,
    parts: Sequence[LayerParts],
    targets: Sequence[Target],
    acc: GradientAccumulator | None,
    inputs: InputHooks,
    method: str,
    aggregation: str,
    fisher_scale: str,
    progress: _Progress,
    total: int,
    seconds: float,
    metadata: dict[str, Any],
) -> ImportanceResult:
    first_order = None
    if acc is not None:
        fisher = (lambda t: acc.fisher(t.key)) if acc.second_order else None
        scores, first = taylor_group_scores(
            parts, targets, lambda t: acc.mean_grad(t.key), fisher, aggregation
        )
        if first is not None:
            first_order = {"attention": first.attention, "mlp": first.mlp}
    else:
        scores = wanda_group_scores(parts, targets, lambda t: inputs.input_norm(t.layer, t.module))
    losses = progress.losses
    metadata = {
        **metadata,
        "mean_loss": sum(losses) / len(losses),
        "num_layers": len(parts),
        "attention_groups": [p.num_kv_heads for p in parts],
        "mlp_groups": [p.intermediate_size for p in parts],
        "num_heads": [p.num_heads for p in parts],
        "head_dim": [p.head_dim for p in parts],
    }
    return ImportanceResult(
        method=method,
        aggregation=aggregation,
        fisher_scale=fisher_scale,
        attention=scores.attention,
        mlp=scores.mlp,
        first_order=first_order,
        stats=aggregate([b["stats"] for b in progress.batch_stats]),
        stats_label="gradient" if acc is not None else "activation",
        batch_stats=progress.batch_stats,
        input_sums=inputs.input_sums(),
        input_tokens=inputs.tokens,
        batches=total,
        tokens=sum(int(b["tokens"]) for b in progress.batch_stats),
        seconds=seconds,
        metadata=metadata,
    )
