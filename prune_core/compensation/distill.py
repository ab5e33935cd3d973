"""Distillation after surgery: the pruned model learns the dense model's next-token distribution.

Why: reconstruction (reconstruct.py) refits one projection per block in closed form; what it cannot
reach (the gate/up weights, the norms, the interaction of many small errors) a few optimizer steps
can. Training on the *dense model's* distribution (knowledge distillation) rather than on the text's
next tokens keeps the pruned model close to the original everywhere the original is good, so it does
not drift toward the calibration domain the way a plain fine-tune does. Measured on smollm2-135m at
40 % (BENCHMARKS.md, "Distillation"): 48 steps of 4 windows lower perplexity on the calibration
domain and on another domain; cross-entropy on the same windows helps the first and hurts the second.

THE CONTRACT (`[distill]`, the `distill` stage of prune_core/pipeline.py):
- Windows: the calibration windows (dataset windows and any windows the model generated itself,
  `[data] generated_samples`); the proxy's held-out windows are never trained on. Step s takes
  `batch_size` windows of a seeded permutation (a new permutation each pass over the windows).
- Loss: mean over predicted tokens of KL(dense ‖ pruned) of the next-token distributions (full
  vocabulary, temperature 1; the dense model is the teacher and runs without gradients), plus
  `ce_weight` × the windows' own next-token cross-entropy (0 = pure distillation), over the step's
  windows or (`ce_windows = "dataset"`, `DistillSettings.ce_rows`) over those of them that come from
  the dataset — a generated window's next tokens are samples of the teacher, which the KL already
  scores exactly; a step without such a window has the KL alone.
- Trained: `train = "layers"` every parameter of the decoder layers (embeddings, final norm and
  output head stay as they are, so tied embeddings stay tied); `"mlp"` only the MLP projections.
- AdamW (betas 0.9/0.999, no weight decay), learning rate with training.py's schedule (5 % warm-up,
  cosine to lr/10). The student trains in float32 and is cast back to its own dtype.
- Checkpoints (`store`, the stage's checkpoint folder; recovery_checkpoint.py's format: safetensors
  and JSON, every file's sha256 in a manifest): at most every `checkpoint_seconds` and when a stop
  is asked between two steps, the trained parameters, AdamW's state, the losses and the next step
  (three float32 copies of the trained parameters: 1.3 GB for smollm2-135m, ~84 GB for an 8B
  model), so the time between two is also at least 9× what the last one took (≤ 10 % overhead), and
  one that would not fit on the disk (with a 10 % margin) is not written: a warning says so once.
  A run of the same stage (same inputs: the folder is keyed by them) resumes there and ends with the
  weights an uninterrupted run has (the window order is a function of the seed, the learning rate one
  of the step, and the parameters not trained come from the deterministic surgery). A checkpoint of
  other settings or parameters is refused (RunFailed naming the file and `--fresh`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prune_core.diskplan import checkpoint_shortfall
from prune_core.errors import BadInput, Interrupted
from prune_core.events import Checkpointed, EventSink, Notice, Progress, null_sink
from prune_core.recovery_checkpoint import Checkpoint, CheckpointStore, optimizer_state, restore_training
from prune_core.training import lr_at, optimizer_step


@dataclass(frozen=True)
class DistillSettings:
    steps: int
    lr: float
    batch_size: int
    train: str = "layers"
    ce_weight: float = 0.0
    ce_rows: int | None = None  # the cross-entropy reads windows [0, ce_rows) only (None: all)


@dataclass
class DistillReport:
    steps: int
    losses: list[float] = field(default_factory=list)
    trainable_parameters: int = 0
    seconds: float = 0.0


def trainable(model: nn.Module, adapter: object, train: str) -> list[nn.Parameter]:
    """The parameters `train` names, with requires_grad turned on (every other one turned off)."""
    layers = adapter.layers(model)  # type: ignore[attr-defined]
    chosen: list[nn.Parameter] = []
    if train == "layers":
        chosen = list(layers.parameters())
    elif train == "mlp":
        for i in range(len(layers)):
            for lin in adapter.parts(model, i).mlp_linears.values():  # type: ignore[attr-defined]
                chosen.extend(lin.parameters())
    else:
        raise BadInput(f"distill train = {train!r} is not one of layers, mlp", 'use train = "layers" or "mlp"')
    for p in model.parameters():
        p.requires_grad_(False)
    unique = list({id(p): p for p in chosen}.values())
    for p in unique:
        p.requires_grad_(True)
    return unique


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) between next-token distributions (float32)."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def ce_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `ids` [rows, seq_len] under `logits` [rows, seq_len - 1, vocab] (float32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def window_order(count: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """The window index of every training slot: seeded permutations of range(count), one per pass."""
    g = torch.Generator().manual_seed(seed)
    passes = math.ceil(steps * batch_size / count)
    return torch.cat([torch.randperm(count, generator=g) for _ in range(passes)])[: steps * batch_size]


def _identity(settings: DistillSettings, tokens: torch.Tensor, seed: int) -> dict[str, object]:
    return {"settings": asdict(settings), "windows": list(tokens.shape), "seed": int(seed)}


def _resume(checkpoint: Checkpoint, store: CheckpointStore, named: list[tuple[str, nn.Parameter]],
            opt: torch.optim.Optimizer, identity: dict[str, object], steps: int) -> tuple[int, list[float], float]:
    """Load `checkpoint` into the parameters and the optimizer: (next step, losses so far, seconds so far)."""
    if checkpoint.meta.get("identity") != identity:
        raise store.damaged("meta file", f"was written for other settings ({checkpoint.meta.get('identity')!r}, "
                                         f"this run: {identity!r})")
    start, losses = restore_training(checkpoint, store, named, opt, steps, "param", "parameter")
    return start, losses, float(checkpoint.meta.get("seconds", 0.0))


def distill(student: nn.Module, teacher: nn.Module, adapter: object, tokens: torch.Tensor,
            settings: DistillSettings, *, seed: int, on_event: EventSink = null_sink,
            should_stop: Callable[[], bool] | None = None, stage: str = "distill",
            store: CheckpointStore | None = None, checkpoint_seconds: float = 60.0) -> DistillReport:
    """Train `student` in place toward `teacher`'s next-token distributions on `tokens` [N, seq_len].

    With `store`, checkpoints as the module docstring says and resumes from one it holds; the caller
    clears it once the model the stage returns is in use.
    """
    if tokens.dim() != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise BadInput(f"distillation windows {tuple(tokens.shape)} are not [windows, seq_len >= 2]",
                       "pass the calibration windows")
    if settings.steps < 1 or settings.batch_size < 1:
        raise BadInput(f"distill steps {settings.steps} and batch_size {settings.batch_size} must be >= 1",
                       "set [distill] steps and batch_size to 1 or more")
    dtype = next(student.parameters()).dtype
    student.float()
    params = trainable(student, adapter, settings.train)
    names = {id(p): n for n, p in student.named_parameters()}
    named = [(names[id(p)], p) for p in params]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    device = params[0].device
    order = window_order(tokens.shape[0], settings.steps, settings.batch_size, seed)
    report = DistillReport(steps=settings.steps, trainable_parameters=sum(p.numel() for p in params))
    identity = _identity(settings, tokens, seed)
    start, seconds_before = 0, 0.0
    if store is not None and store.exists():
        resumed = store.load()
        if resumed is not None:
            start, report.losses, seconds_before = _resume(resumed, store, named, opt, identity, settings.steps)
            on_event(Notice(f"resuming the distillation from step {start}/{settings.steps}", "info", stage))
    started = time.perf_counter()
    last_save = time.monotonic()
    spent = 0.0  # seconds the last checkpoint took: the next one waits at least 9× that (≤ 10 % of the time)
    short_warned = False

    def checkpoint(next_step: int) -> bool:
        """Write the state before step `next_step`; False when there is nothing new or no room for it."""
        nonlocal spent, short_warned
        if store is None or next_step <= start:
            return False
        opt_tensors, opt_index = optimizer_state(opt)
        tensors = {f"param.{n}": p for n, p in named} | opt_tensors
        short = checkpoint_shortfall(store.folder, tensors, "distillation", "steps")
        if short is not None:
            if not short_warned:
                short_warned = True
                on_event(Notice(short, "warning", stage))
            return False
        meta = {"identity": identity, "next_step": next_step, "total_steps": settings.steps,
                "losses": report.losses[:next_step], "optimizer": opt_index,
                "seconds": seconds_before + time.perf_counter() - started}
        t0 = time.monotonic()
        path = store.save(meta, tensors)
        spent = time.monotonic() - t0
        on_event(Checkpointed(stage, next_step, str(path.parent), unit="step"))
        return True

    was_training = student.training
    teacher.eval()
    student.train()
    try:
        for step in range(start, settings.steps):
            if should_stop is not None and should_stop():
                # the checkpoint just written, else the one this run resumed from (if any)
                at = step if checkpoint(step) else (start if store is not None else 0)
                resume = f"resumes at step {at}" if at else "starts over"
                raise Interrupted(f"distillation stopped after step {step}/{settings.steps}",
                                  f"run the same command again: the distillation {resume}")
            if step > start and time.monotonic() - last_save >= max(checkpoint_seconds, 9 * spent):
                checkpoint(step)
                last_save = time.monotonic()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, settings)
            picked = order[step * settings.batch_size:(step + 1) * settings.batch_size]
            ids = tokens[picked].to(device=device, dtype=torch.long)
            with torch.no_grad():
                target = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
            logits = student(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = kl_loss(logits, target)
            if settings.ce_weight:
                rows = (picked < settings.ce_rows).to(device) if settings.ce_rows is not None else None
                if rows is None or bool(rows.all()):
                    loss = loss + settings.ce_weight * ce_loss(logits, ids)
                elif bool(rows.any()):
                    loss = loss + settings.ce_weight * ce_loss(logits[rows], ids[rows])
            value = optimizer_step(opt, loss, f"the distillation loss at step {step + 1}/{settings.steps}",
                                   "lower [distill] lr (e.g. by 10x)")
            report.losses.append(value)
            recent = report.losses[-8:]
            on_event(Progress(stage=stage, done=step + 1, total=settings.steps, unit="steps",
                              message=f"step {step + 1}/{settings.steps} loss {value:.4f} "
                                      f"(last 8: {sum(recent) / len(recent):.4f})"))
    finally:
        student.train(was_training)
        for p in student.parameters():
            p.requires_grad_(False)
        student.to(dtype)
    report.seconds = seconds_before + time.perf_counter() - started
    return report
