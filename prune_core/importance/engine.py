"""run_importance: the importance pass (every method of registry.py) with live stats and resume.

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
magnitude: data-free (data_free.py), no batches: group importance = sqrt(Σ w²) over all the group's parameters
(weights and q/k/v/gate/up biases); the statistics are of the weights (stats_label "weight"),
batches = tokens = 0 and the input sums are zeros (input_tokens 0), so bias compensation adds
nothing. `tokens` is not read (an empty [0, S] tensor is fine).
Which pass runs, which statistics it reports and how the groups are scored are declared by the
method's MethodSpec (registry.py); group membership by the adapter's layout (adapters/base.py).
Every data pass also sums the inputs of o_proj and down_proj over all tokens (input_sums, input_tokens)
for FLAP-style bias compensation. All accumulators are plain sums (Σg, Σn·g², Σx², Σx, counts),
divided only when the result is produced, so a data-parallel all-reduce can be added later.

Live statistics (stats.py) go out in a BatchDone event after every batch. A gradient pass takes them
every `stats_every`-th batch (batch b when b % stats_every == 0, whatever the rank or resume point) from
`stats_sample` of each weight gradient's rows (accumulate.py); the other batches' events repeat the
latest statistics and their records hold None (the result's stats average the batches that took them).
On CPU the weight gradients are summed inside the backward GEMM (fused_linear.py), and a failed batch
is taken back out by running it again. The pass checkpoints to
`checkpoint_dir` (state.py) every `checkpoint_seconds` (0 = every batch), when should_stop() turns
true (then raises Interrupted) and when a batch fails with NaN/Inf (then raises RunFailed naming
the batch and module; the checkpoint holds everything accumulated before that batch). A checkpoint
with the same identity is resumed from its batch; one with a different identity is refused. After
a successful pass the checkpoint is deleted (the caller caches the ImportanceResult). Checkpoints of
the same stage made for other inputs beside it (`state.other_checkpoints`: an interrupted pass, then
another num_samples) are named in a Notice at the start and deleted after a successful pass.
The pass leaves process-wide settings alone: the glibc malloc tuning that makes CPU passes faster
is applied by the `prune` and `python -m tui` processes at their start, not here (allocator.py).

Several processes (prune_core/distributed.py; a world of one changes nothing): batch i is read by
rank i % world, in rounds of `world` batches. After every round the ranks exchange each batch's
loss and statistics (all_gather_object), so every rank holds batch_stats in batch order, and agree
on stopping and checkpointing (all-reduce MAX of the flags: rank 0's clock decides a periodic
checkpoint, a stop asked on any rank stops all). A checkpoint all-reduces the sums (SUM; the token
count too); rank 0 keeps the totals and writes them, the others zero theirs, so the final all-reduce
at the end of the pass again gives the totals. The in-hook shares of the last batch are not used
(that batch is on one rank): the scores come from the reduced sums, as when a pass resumes at its
end. Only rank 0 reads and writes the checkpoint and emits events; it sends the others the batch to
start from. A checkpoint records the world size; a resume with another world size is refused. A
NaN/Inf batch fails every rank without a new checkpoint (the other batches of its round are
already in the sums), so the last periodic checkpoint is what a rerun resumes from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_core import distributed
from prune_core.adapters.base import Adapter
from prune_core.data import token_fingerprint
from prune_core.dense_stream import StreamRecorder
from prune_core.diskplan import checkpoint_shortfall
from prune_core.errors import BadInput, Interrupted, PruneError, RunFailed
from prune_core.events import (
    BatchDone,
    Checkpointed,
    EventSink,
    LayerStats,
    Notice,
    StageDone,
    StageStarted,
    null_sink,
)
from prune_core.importance.accumulate import GradientAccumulator, NonFiniteGradient
from prune_core.importance.data_free import data_free_importance
from prune_core.importance.groups import TaylorPartial, prunable_targets, targets_digest
from prune_core.importance.hooks import InputHooks
from prune_core.importance.methods.spec import MethodScores, MethodSpec, ScoreInputs
from prune_core.importance.nonfinite import locate_nonfinite
from prune_core.importance.prepare import prepared
from prune_core.importance.registry import STATS_EVERY, STATS_SAMPLE, get_method
from prune_core.importance.result import ENGINE_VERSION, ImportanceResult
from prune_core.importance.state import CheckpointStore, identity_differences, other_checkpoints
from prune_core.importance.stats import BlockStats, aggregate

AGGREGATIONS = ("element", "vector")
FISHER_SCALES = ("tokens", "none")
HESSIAN_DEVICES = ("auto", "cpu", "device")
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
NAN_FIX = (
    'load the model in float32 (dtype = "float32") or use shorter sequences (seq_len); '
    "if a weight itself is NaN/Inf the model file is damaged"
)


def batch_slices(num_samples: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of the batches: consecutive, in order, the last one possibly smaller."""
    return [(i, min(i + batch_size, num_samples)) for i in range(0, num_samples, batch_size)]


def _validate(
    tokens: torch.Tensor,
    method: str,
    aggregation: str,
    fisher_scale: str,
    batch_size: int,
    hessian_device: str,
    checkpoint_seconds: float,
    stats_sample: float = 1.0,
    stats_every: int = 1,
) -> None:
    bad = BadInput
    if isinstance(stats_every, bool) or not isinstance(stats_every, int) or stats_every < 1:
        raise bad(f"stats_every must be a whole number >= 1 (got {stats_every!r})",
                  "use 1 for statistics after every batch, or e.g. 4 for every fourth")
    if not (isinstance(stats_sample, int | float) and 0.0 < stats_sample <= 1.0):
        raise bad(f"stats_sample must be in (0, 1] (got {stats_sample!r})",
                  "use 1 for statistics of every gradient element, or a share such as 0.0625")
    spec = get_method(method)
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
    if not spec.needs_calibration:
        return
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


class _BatchFailed(Exception):
    """A batch produced NaN/Inf; `where` names the module when known (else it is located)."""

    def __init__(self, where: str | None) -> None:
        super().__init__(where)
        self.where = where


class _Pass:
    """One importance pass: the accumulators, the batch loop, checkpoints and the result."""

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        tokens: torch.Tensor,
        *,
        method: str,
        aggregation: str,
        fisher_scale: str,
        batch_size: int,
        identity: dict[str, Any],
        store: CheckpointStore | None,
        emit: EventSink,
        stage: str,
        stats_sample: float = 1.0,
        stats_every: int = 1,
        recorder: StreamRecorder | None = None,
    ) -> None:
        self.model, self.adapter, self.tokens = model, adapter, tokens
        self.recorder = recorder
        self.stats_sample, self.stats_every = stats_sample, stats_every
        self.method, self.aggregation, self.fisher_scale = method, aggregation, fisher_scale
        self.batch_size, self.store, self.emit, self.stage = batch_size, store, emit, stage
        self.world = distributed.world()
        self.spec: MethodSpec = get_method(method)
        self.grad_pass = self.spec.needs_gradients
        self.parts = adapter.all_parts(model)
        self.targets = prunable_targets(self.parts)
        self.device = self.targets[0].param.device
        self.num_samples, self.seq_len = int(tokens.shape[0]), int(tokens.shape[1])
        self.slices = batch_slices(self.num_samples, batch_size)
        self.total = len(self.slices)
        layout, sample = targets_digest(self.targets)
        self.identity = {
            "engine": {
                "version": ENGINE_VERSION,
                "method": method,
                "fisher_scale": fisher_scale if self.spec.needs_fisher else None,
                "batch_size": batch_size,
                "num_samples": self.num_samples,
                "seq_len": self.seq_len,
                "tokens_sha256": token_fingerprint(tokens),
                "parameters_sha256": layout,
                "weights_sample_sha256": sample,
            },
            "caller": identity,
        }
        self.progress = _Progress()
        self.saved_batch = 0  # the batches the checkpoint on disk holds (0: none)
        self.short_warned = False  # a checkpoint was skipped for want of disk space (warned once)
        self.acc: GradientAccumulator | None = None
        self.inputs: InputHooks | None = None
        # the last batch computes each parameter's share of the scores right after adding it in
        self.partials: dict[int, TaylorPartial] = {}
        self._scratch: torch.Tensor | None = None
        self.started = time.perf_counter()

    # set-up ------------------------------------------------------------------------------------
    def attach(self, stack: ExitStack, hessian_device: str, gradient_checkpointing: bool) -> None:
        stack.enter_context(
            prepared(
                self.model,
                grad_params=[t.param for t in self.targets] if self.grad_pass else None,
                layers=list(self.adapter.layers(self.model)),
                gradient_checkpointing=gradient_checkpointing and self.grad_pass,
            )
        )
        self.inputs = stack.enter_context(InputHooks(self.parts, squares=not self.grad_pass))
        if self.recorder is not None:
            layers = self.adapter.layers(self.model)
            self.recorder.attach(stack, list(layers), [getattr(layer, self.adapter.attn_name) for layer in layers])
        if self.grad_pass:
            second = self.spec.needs_fisher
            nbytes = sum(t.param.numel() for t in self.targets) * 4
            hdev = (
                _choose_hessian_device(hessian_device, self.device, nbytes, self.emit, self.stage)
                if second
                else self.device
            )
            named = [(t.key, t.param) for t in self.targets]
            linears = {i: self.parts[t.layer].linear(t.path) for i, t in enumerate(self.targets) if t.kind == "weight"}
            self.acc = stack.enter_context(
                GradientAccumulator(named, second_order=second, hessian_device=hdev, linears=linears,
                                    stats_sample=self.stats_sample)
            )
            self.plan = BlockStats([(t.layer, t.block) for t in self.targets], len(self.parts))
        else:
            self.plan = BlockStats(self.inputs.owners(), len(self.parts))

    def restore(self) -> None:
        """Resume from the checkpoint in the store, if there is one with the same identity.

        With several ranks, rank 0 reads it and sends the others where to start (or its error):
        rank 0 holds the checkpoint's totals, the others start from zero sums.
        """
        w = self.world
        if not w.active:
            self._restore_local()
            return
        if w.is_main:
            try:
                self._restore_local()
            except PruneError as exc:
                distributed.announce(w, "abort", exc)
                raise
            distributed.announce(w, "compute")
        else:
            distributed.follow(w)
        p = self.progress
        start, stats, seconds = w.broadcast((p.next_batch, p.batch_stats, p.seconds_before))
        if not w.is_main:
            self.progress = _Progress(next_batch=start, batch_stats=list(stats), seconds_before=float(seconds),
                                      resumed_from=start)

    def _restore_local(self) -> None:
        ckpt = self.store.load() if self.store is not None else None
        if ckpt is None or self.store is None:
            return
        stored_world = ckpt.meta.get("world_size", 1)
        if stored_world != self.world.size:
            raise BadInput(
                f"the checkpoint in {self.store.folder} was written by a run of world size {stored_world} "
                f"({stored_world} processes), this run has world size {self.world.size}",
                f"resume with {stored_world} process(es) (torchrun --nproc_per_node {stored_world}), "
                "or run with --fresh to start the pass over",
            )
        self.store.check_identity(ckpt.meta.get("identity", {}), self.identity)
        start = self._checked_start(ckpt.meta)
        self.progress = _Progress(
            next_batch=start,
            batch_stats=list(ckpt.meta["batch_stats"]),
            seconds_before=float(ckpt.meta["seconds"]),
            resumed_from=start,
        )
        self.saved_batch = start
        if self.acc is not None:
            self.acc.load_state_tensors(ckpt.tensors, start)
        assert self.inputs is not None
        self.inputs.load_state_tensors(ckpt.tensors, int(ckpt.meta["input_tokens"]))
        self.emit(Notice(f"resuming from batch {start}/{self.total}", "info", self.stage))

    def _checked_start(self, meta: dict[str, Any]) -> int:
        """The batch to resume from, after cross-checking the meta's counts with each other and this pass."""
        assert self.store is not None
        name = "meta file"
        start, stats, tokens = meta.get("next_batch"), meta.get("batch_stats"), meta.get("input_tokens")
        if not isinstance(start, int) or isinstance(start, bool) or not 0 < start <= self.total:
            raise self.store.damaged(name, f"names batch {start!r}, not one of 1..{self.total}")
        if meta.get("total_batches") != self.total:
            raise self.store.damaged(name, f"was made for {meta.get('total_batches')!r} batches, this pass has "
                                           f"{self.total}")
        if not isinstance(stats, list) or len(stats) != start:
            raise self.store.damaged(name, f"holds {len(stats) if isinstance(stats, list) else 'no'} batch "
                                           f"statistics for {start} batches done")
        expected = sum(hi - lo for lo, hi in self.slices[:start]) * self.seq_len
        if tokens != expected:
            raise self.store.damaged(name, f"counts {tokens!r} input tokens, {start} batches make {expected}")
        return start

    def stale_checkpoints(self) -> list[Path]:
        """Checkpoints beside this pass's that were made for other inputs: each is named once, here, and
        the caller removes them when this pass completes (a changed num_samples leaves no stale state)."""
        if self.store is None:
            return []
        stale = other_checkpoints(self.store.folder)
        for folder in stale:
            stored = CheckpointStore(folder).stored_identity()
            shown = _changed_settings(stored, self.identity) if stored is not None else "settings not readable"
            self.emit(Notice(f"the checkpoint of an interrupted pass in {folder} was made for other inputs "
                             f"({shown}), so it is not resumed: this pass starts afresh and removes that checkpoint "
                             "when it completes (to resume it instead, stop now and restore those settings)",
                             "warning", self.stage))
        return stale

    # checkpoints -------------------------------------------------------------------------------
    def _reduce(self, final: bool) -> None:
        """All-reduce the sums over the ranks (SUM). At a checkpoint rank 0 keeps the totals and the
        others zero theirs (so the final reduction counts each batch once); `final` leaves the totals
        on every rank."""
        assert self.inputs is not None
        w = self.world
        tensors = [*(self.acc.state_tensors().values() if self.acc is not None else ()),
                   *self.inputs.state_tensors().values()]
        w.all_reduce_(tensors)
        tokens = int(w.sum_numbers([self.inputs.tokens])[0])
        if final or w.is_main:
            self.inputs.tokens = tokens
        else:
            with torch.no_grad():
                for t in tensors:
                    t.zero_()
            self.inputs.tokens = 0
        if final and self.acc is not None:
            self.acc.batches = self.total

    def checkpoint(self, next_batch: int) -> None:
        if self.world.active:
            self._reduce(final=False)
        if self.store is None:
            return
        assert self.inputs is not None
        tensors = {
            **(self.acc.state_tensors() if self.acc is not None else {}),
            **self.inputs.state_tensors(),
        }
        short = checkpoint_shortfall(self.store.folder, tensors, "importance", "batches")
        if short is not None:
            if not self.short_warned:
                self.short_warned = True
                self.emit(Notice(short, "warning", self.stage))
            return
        meta = {
            "identity": self.identity,
            "next_batch": next_batch,
            "total_batches": self.total,
            "method": self.method,
            "batch_stats": self.progress.batch_stats[:next_batch],
            "input_tokens": self.inputs.tokens,
            "seconds": self.seconds(),
            "world_size": self.world.size,
        }
        path = self.store.save(meta, tensors)
        self.saved_batch = next_batch
        self.emit(Checkpointed(self.stage, next_batch, str(path.parent)))

    def seconds(self) -> float:
        return self.progress.seconds_before + (time.perf_counter() - self.started)

    # one batch ---------------------------------------------------------------------------------
    def _finalize(self, i: int, grad_sum: torch.Tensor, sq_sum: torch.Tensor | None) -> None:
        if self._scratch is None:
            size = max(t.param.numel() for t in self.targets)
            self._scratch = torch.empty(size, dtype=grad_sum.dtype, device=grad_sum.device)
        t = self.targets[i]
        assert self.spec.partial is not None
        self.partials[i] = self.spec.partial(
            t, self.parts[t.layer], grad_sum, sq_sum, self.aggregation, self._scratch
        )

    def _forward_backward(self, b: int, ids: torch.Tensor) -> tuple[float, list[list[float]], list[int]]:
        """Loss and stat rows of batch b; raises _BatchFailed (sums unchanged) on NaN/Inf."""
        inputs, acc = self.inputs, self.acc
        assert inputs is not None
        rows = ids.shape[0]

        def forward() -> torch.Tensor:  # also run again to take a failed batch back out (accumulate.py)
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss

        inputs.begin_batch()
        try:
            if acc is None:
                with torch.no_grad():
                    loss = forward()
                inputs.end_forward()
                stat_rows, counts = inputs.rows.tolist(), inputs.counts
            else:
                loss = forward()
                inputs.end_forward()
                if acc.streaming and not math.isfinite(float(loss.detach())):
                    raise _BatchFailed(None)  # on CPU the check is free: skip the backward
                weight = rows * (self.seq_len - 1) if self.fisher_scale == "tokens" else 1.0
                final = self._finalize if b == self.total - 1 and not self.world.active else None
                try:
                    stat_rows = acc.accumulate(loss, weight=weight, finalize=final, stats=self.stats_batch(b),
                                               stats_index=b // self.stats_every, recompute=forward)
                    counts = list(acc.counts)
                except NonFiniteGradient as exc:
                    self.partials.clear()
                    # a NaN loss makes every gradient NaN: then the forward pass is the place to look
                    finite_loss = math.isfinite(float(loss.detach()))
                    raise _BatchFailed(f"gradient of {exc.key}" if finite_loss else None) from exc
            loss_value = float(loss.detach())
        except RuntimeError as exc:
            if isinstance(exc, _OOM) or "out of memory" in str(exc).lower():
                raise RunFailed(
                    f"out of memory in batch {b + 1}/{self.total} of the importance pass",
                    'lower batch_size or seq_len, enable gradient_checkpointing, or set hessian_device = "cpu"',
                ) from exc
            if "two gradients" in str(exc):
                raise RunFailed(str(exc), "use a model of a supported family") from exc
            raise
        finally:
            inputs.end_forward()
        if not math.isfinite(loss_value):
            raise _BatchFailed(None)
        where = inputs.first_nonfinite()
        if where is not None:
            raise _BatchFailed(where)
        return loss_value, stat_rows, counts

    def _batch_record(self, b: int) -> dict[str, Any]:
        """Run batch b and add it in; its loss, tokens and statistics. Raises _BatchFailed naming the cause."""
        lo, hi = self.slices[b]
        ids = self.tokens[lo:hi].to(device=self.device, dtype=torch.long)
        if self.recorder is not None:
            self.recorder.begin_batch(b)
        try:
            loss, stat_rows, counts = self._forward_backward(b, ids)
        except _BatchFailed as exc:
            raise _BatchFailed(exc.where or locate_nonfinite(self.model, ids) or "the loss") from None
        assert self.inputs is not None
        self.inputs.commit((hi - lo) * self.seq_len)
        layer_stats = self.plan.combine(stat_rows, counts) if self.stats_batch(b) else None
        return {"loss": loss, "tokens": (hi - lo) * self.seq_len, "stats": layer_stats}

    def stats_batch(self, b: int) -> bool:
        """Whether batch b takes statistics (every stats_every-th of a gradient pass; every batch of wanda)."""
        return self.acc is None or b % self.stats_every == 0

    def shown_stats(self, record: dict[str, Any]) -> LayerStats:
        """What a BatchDone shows for a recorded batch: its statistics, or (a batch that took none) those of
        the latest batch that did."""
        if record["stats"] is not None:
            return record["stats"]
        return next((r["stats"] for r in reversed(self.progress.batch_stats) if r["stats"] is not None), {})

    def run_batch(self, b: int) -> tuple[float, LayerStats]:
        try:
            record = self._batch_record(b)
        except _BatchFailed as exc:
            cause = exc.where
            if self.acc is not None and self.acc.damaged:
                # the failed batch could not be taken back out (its recomputation differed): the sums in
                # memory are not those of batches 1–b, so the last periodic checkpoint is what a rerun gets
                kept = f"; the last periodic checkpoint in {self.store.folder} is kept" if self.store else ""
            else:
                self.checkpoint(b)
                kept = (
                    f"; batches 1–{self.saved_batch} are checkpointed in {self.store.folder}"
                    if self.store is not None and self.saved_batch
                    else ""
                )
            raise RunFailed(
                f"NaN/Inf in batch {b + 1}/{self.total} of the {self.method} pass ({cause}){kept}", NAN_FIX
            ) from None
        self.progress.batch_stats.append(record)
        return record["loss"], self.shown_stats(record)

    # the loop ----------------------------------------------------------------------------------
    def _batch_done(self, b: int, loss: float, layer_stats: LayerStats, session_tokens: int, now: float) -> None:
        elapsed = now - self.started
        losses = self.progress.losses
        self.emit(
            BatchDone(
                stage=self.stage,
                batch=b + 1,
                total=self.total,
                loss=loss,
                mean_loss=sum(losses) / len(losses),
                tokens_per_s=session_tokens / elapsed if elapsed > 0 else 0.0,
                eta_s=(self.total - b - 1) * elapsed / (b + 1 - self.progress.resumed_from),
                layer_stats=layer_stats,
                stats_label=self.spec.stats_label,
                resumed_from=self.progress.resumed_from,
            )
        )

    def _stopped(self, done: int) -> Interrupted:
        if self.store is not None and self.saved_batch:
            kept = f"batches 1–{self.saved_batch} are checkpointed in {self.store.folder}"
            fix = "run again with the same settings to resume"
        elif self.store is not None:
            kept, fix = "no checkpoint could be written (see the warning above)", "run again: the pass starts over"
        else:
            kept, fix = "no checkpoint_dir was given, so progress is not kept", None
        return Interrupted(f"importance pass stopped after batch {done}/{self.total}; {kept}", fix)

    def loop_ranks(self, should_stop: Callable[[], bool] | None, checkpoint_seconds: float) -> None:
        """The batch loop of a pass shared by several ranks: rounds of `world` batches (module docstring)."""
        w = self.world
        self.started = last_checkpoint = time.perf_counter()
        session_tokens = 0
        for first in range(self.progress.next_batch, self.total, w.size):
            b = first + w.rank
            mine: tuple[str, int, Any] | None = None
            if b < self.total:
                try:
                    mine = ("ok", b, self._batch_record(b))
                except _BatchFailed as exc:
                    mine = ("failed", b, exc.where)
            outcomes = sorted((o for o in w.gather(mine) if o is not None), key=lambda o: o[1])
            failed = [o for o in outcomes if o[0] == "failed"]
            if failed:
                _, bad, cause = failed[0]
                kept = f"; the last periodic checkpoint in {self.store.folder} is kept" if self.store else ""
                raise RunFailed(f"NaN/Inf in batch {bad + 1}/{self.total} of the {self.method} pass ({cause}, "
                                f"rank {bad % w.size} of {w.size}){kept}", NAN_FIX)
            now = time.perf_counter()
            for _, done_batch, record in outcomes:
                self.progress.batch_stats.append(record)
                session_tokens += int(record["tokens"])
                self._batch_done(done_batch, float(record["loss"]), self.shown_stats(record), session_tokens, now)
            done = min(first + w.size, self.total)
            if done == self.total:
                break
            asked = bool(should_stop()) if should_stop is not None else False
            due = self.store is not None and now - last_checkpoint >= checkpoint_seconds
            stop, due = w.any_of(asked, due)
            if stop or due:
                self.checkpoint(done)
                last_checkpoint = time.perf_counter()
            if stop:
                raise self._stopped(done)
        self._reduce(final=True)

    def loop(self, should_stop: Callable[[], bool] | None, checkpoint_seconds: float) -> None:
        if self.world.active:
            self.loop_ranks(should_stop, checkpoint_seconds)
            return
        self.started = last_checkpoint = time.perf_counter()
        session_tokens = 0
        for b in range(self.progress.next_batch, self.total):
            loss, layer_stats = self.run_batch(b)
            session_tokens += (self.slices[b][1] - self.slices[b][0]) * self.seq_len
            now = time.perf_counter()
            self._batch_done(b, loss, layer_stats, session_tokens, now)
            if b + 1 == self.total:
                break
            stop = bool(should_stop()) if should_stop is not None else False
            if stop or (self.store is not None and now - last_checkpoint >= checkpoint_seconds):
                self.checkpoint(b + 1)
                last_checkpoint = time.perf_counter()
            if stop:
                raise self._stopped(b + 1)

    # the result --------------------------------------------------------------------------------
    def result(self, gradient_checkpointing: bool) -> ImportanceResult:
        acc, inputs = self.acc, self.inputs
        assert inputs is not None
        ordered = (
            [self.partials[i] for i in range(len(self.targets))]
            if acc is not None and len(self.partials) == len(self.targets)
            else None
        )
        scored: MethodScores = self.spec.score(
            ScoreInputs(
                parts=self.parts,
                targets=self.targets,
                aggregation=self.aggregation,
                batches=acc.batches if acc is not None else 0,
                partials=ordered,
                grad_sum=acc.sum_grad if acc is not None else None,
                sq_sum=acc.sum_sq if acc is not None and acc.second_order else None,
                input_norm=(lambda t: inputs.input_norm(t.layer, t.module)) if inputs.squares else None,
            )
        )
        first = scored.first_order
        first_order = {"attention": first.attention, "mlp": first.mlp} if first is not None else None
        losses = self.progress.losses
        stats = scored.stats if scored.stats is not None else aggregate(
            [b["stats"] for b in self.progress.batch_stats if b["stats"] is not None]
        )
        metadata = {
            "engine_version": ENGINE_VERSION,
            "identity": self.identity,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "seq_len": self.seq_len,
            "dtype": str(self.targets[0].param.dtype).removeprefix("torch."),
            "device": str(self.device),
            "hessian_device": str(acc.hessian_device) if acc is not None and acc.second_order else None,
            "gradient_checkpointing": bool(gradient_checkpointing and self.grad_pass),
            # the share of each weight gradient's rows the statistics read per batch (1: all)
            "stats_sample": self.stats_sample if acc is not None else 1.0,
            "stats_every": self.stats_every if acc is not None else 1,
            "resumed_from": self.progress.resumed_from,
            "mean_loss": sum(losses) / len(losses),
            "num_layers": len(self.parts),
            "attention_groups": [p.num_kv_heads for p in self.parts],
            "mlp_groups": [p.intermediate_size for p in self.parts],
            "num_heads": [p.num_heads for p in self.parts],
            "head_dim": [p.head_dim for p in self.parts],
        }
        if self.world.active:
            metadata["world_size"] = self.world.size
        return ImportanceResult(
            method=self.method,
            aggregation=self.aggregation,
            fisher_scale=self.fisher_scale,
            attention=scored.scores.attention,
            mlp=scored.scores.mlp,
            first_order=first_order,
            stats=stats,
            stats_label=self.spec.stats_label,
            batch_stats=self.progress.batch_stats,
            input_sums=inputs.input_sums(),
            input_tokens=inputs.tokens,
            batches=self.total,
            tokens=sum(int(b["tokens"]) for b in self.progress.batch_stats),
            seconds=self.seconds(),
            metadata=metadata,
        )


def _changed_settings(stored: dict[str, Any], current: dict[str, Any], most: int = 4) -> str:
    """The settings two identities differ in, by their last key ("num_samples: 48 → 32"); digests only
    when nothing else differs."""
    seen: dict[str, str] = {}
    for line in identity_differences(stored, current):
        dotted, _, change = line.partition(": ")
        seen.setdefault(dotted.rpartition(".")[2], change)
    plain = [k for k in seen if not k.endswith(("sha256", "fingerprint"))] or list(seen)
    return "; ".join(f"{k}: {seen[k]}" for k in plain[:most]) or "no difference found"


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
    stats_sample: float = STATS_SAMPLE,
    stats_every: int = STATS_EVERY,
    recorder: StreamRecorder | None = None,
) -> ImportanceResult:
    """Run the importance pass over `tokens` and return group importance (see module docstring).

    should_stop() is polled after every batch but the last; when true the pass checkpoints (if
    checkpoint_dir is set) and raises errors.Interrupted. identity (model fingerprint, data
    fingerprint, ...) is stored in the checkpoint together with the engine's own (method, batch
    size, token sha256, parameter layout); a checkpoint whose identity differs is refused (BadInput).
    `recorder` (prune_core/dense_stream.py) records the dense model's per-layer outputs of the batches this
    process runs; the result carries them as `dense_stream` when every such batch was recorded (not after
    a resume, which skips the batches before its checkpoint).
    """
    emit: EventSink = on_event or (lambda event: None)
    if not distributed.world().is_main:  # rank 0 reports and writes for all ranks
        emit, checkpoint_dir = null_sink, None
    _validate(tokens, method, aggregation, fisher_scale, batch_size, hessian_device, checkpoint_seconds,
              stats_sample, stats_every)
    spec = get_method(method)
    if aggregation not in spec.aggregations:
        emit(
            Notice(
                f"{method} scores are always summed per element; aggregation {aggregation!r} is ignored",
                stage=stage,
            )
        )
        aggregation = "element"
    if gradient_checkpointing and not spec.needs_gradients:
        emit(Notice(f"gradient checkpointing is ignored by {method} (no backward pass)", stage=stage))
    if not spec.needs_calibration:
        return data_free_importance(model, adapter, spec, aggregation, fisher_scale, identity or {}, emit, stage)
    store = CheckpointStore(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    run = _Pass(
        model,
        adapter,
        tokens,
        method=method,
        aggregation=aggregation,
        fisher_scale=fisher_scale,
        batch_size=batch_size,
        identity=identity or {},
        store=store,
        emit=emit,
        stage=stage,
        stats_sample=stats_sample,
        stats_every=stats_every,
        recorder=recorder,
    )
    dtype = run.targets[0].param.dtype
    if dtype in (torch.float16, torch.bfloat16):
        emit(Notice(f"model is {str(dtype).removeprefix('torch.')}: sums are kept in float32", "info", stage))
    description = f"{method} importance: {run.num_samples}×{run.seq_len} tokens, batch size {batch_size}"
    emit(StageStarted(stage, description, run.total))
    with ExitStack() as stack:
        run.attach(stack, hessian_device, gradient_checkpointing)
        run.restore()
        stale = run.stale_checkpoints()
        run.loop(should_stop, checkpoint_seconds)
        result = run.result(gradient_checkpointing)
    if recorder is not None and not run.progress.resumed_from:
        result.dense_stream = recorder.result()
    if store is not None:
        store.clear()
    for folder in stale:
        try:
            CheckpointStore(folder).clear()
        except OSError as exc:  # the pass itself succeeded: say so, do not fail it
            emit(Notice(f"could not remove the checkpoint made for other inputs in {folder} ({exc.strerror})",
                        "warning", stage))
        else:
            emit(Notice(f"removed the checkpoint made for other inputs in {folder}", "info", stage))
    losses = run.progress.losses
    emit(
        StageDone(
            stage, result.seconds, summary=f"{run.total} batches, mean loss {sum(losses) / len(losses):.4f}"
        )
    )
    return result
