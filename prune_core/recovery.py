"""Recovery fine-tuning: LoRA on a saved pruned model, resumable, merged back into the same folder format.

Why: a pruned model loses quality that a short fine-tune wins back (LLM-Pruner's LoRA recovery).
`prune recover RESULTS` (and the workbench's Recover action) call `recover()`:

    RESULTS/model/             the pruned model it starts from (prune_core.export folder); a bare
                               model folder M works too: its work folder is then `M-recovery/`
    RESULTS/state/recovery/    the checkpoint while it runs (removed when it finishes)
    RESULTS/recovered/         the merged model, written by export.save_pruned with the recipe's kept
                               indices, so `load_pruned` / `prune eval` read it like any pruned model
    RESULTS/recovery.json      settings, per-step losses, perplexity before and after

THE CONTRACT
Training text: `steps × batch_size` windows of `seq_len` tokens drawn once from the *calibration*
split of `[recovery] dataset` (default `[data] dataset`) with the session seed (data.calibration_tokens);
step s uses windows [s·B, (s+1)·B). The evaluation split is only read for perplexity.
LoRA (peft) on every projection the adapter's group layout names (q/k/v/o and gate/up/down, or
Phi-3's qkv_proj / gate_up_proj), as full module paths, so a removed block (a Zero stand-in) gets
none; dropout 0; A initialised from torch's RNG seeded with the session seed, B zeros.
Loss = model(ids, labels=ids).loss (mean next-token cross-entropy); AdamW (betas 0.9/0.999, eps 1e-8,
no weight decay) with a stateless schedule: linear warm-up over the first 5 % of the steps, then
cosine from lr to lr/10. The model is trained in float32 and cast back to its saved dtype to merge.

Checkpoints (every `checkpoint_seconds`, 0 = every step, and when should_stop() turns true, which then
raises Interrupted): `manifest.json` (format, sha256 of each file), `state-N.safetensors` (LoRA
weights `lora.<name>`, AdamW tensors `optim.<i>.<key>`, torch's RNG state `rng.torch`) and
`meta-N.json` (next step, losses, the optimizer's non-tensor state and param groups, the identity:
model file sha256, settings, seed, token fingerprints, library versions). Nothing is pickled. A resume
restores all of it, so the merged weights are bit-identical to an uninterrupted run's on the same
machine. A checkpoint made for other inputs is refused (BadInput); a file that does not match its
checksum is refused naming the file and `--fresh` (RunFailed).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_core import atomic
from prune_core.digest import file_sha256
from prune_core.errors import BadInput, Interrupted
from prune_core.events import Checkpointed, EventSink, Notice, Progress, StageDone, StageStarted, null_sink
from prune_core.recovery_checkpoint import MANIFEST as MANIFEST  # re-exported: where a checkpoint is found
from prune_core.recovery_checkpoint import Checkpoint, CheckpointStore, optimizer_state, restore_training
from prune_core.training import lr_at, optimizer_step

STAGE = "recovery"
RECOVERED = "recovered"
REPORT = "recovery.json"
CHECKPOINT_DIR = Path("state") / "recovery"
SETTING_KEYS = ("steps", "lr", "rank", "alpha", "batch_size", "seq_len", "dataset", "checkpoint_seconds")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecoverySettings:
    steps: int = 40
    lr: float = 2e-4
    rank: int = 8
    alpha: float = 16.0
    batch_size: int = 4
    seq_len: int = 128
    dataset: str = "shakespeare"
    checkpoint_seconds: float = 60.0

    @classmethod
    def from_session(cls, session: Any, **overrides: Any) -> RecoverySettings:
        """The session's [recovery] values (dataset: [data] dataset when empty), with the non-None overrides."""
        r = session.recovery
        values: dict[str, Any] = {k: getattr(r, k) for k in SETTING_KEYS}
        values["dataset"] = session.recovery_dataset
        unknown = set(overrides) - set(SETTING_KEYS)
        if unknown:
            raise BadInput(f"unknown recovery setting(s) {sorted(unknown)}", f"use {', '.join(SETTING_KEYS)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def validate(self) -> None:
        """BadInput naming the first bad value and its fix."""
        def whole(name: str, value: Any, low: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BadInput(f"{name} must be a whole number >= {low} (got {value!r})",
                               f"pass --{name.replace('_', '-')} {max(low, 1)} or more")

        def positive(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise BadInput(f"{name} must be a finite number above 0 (got {value!r})",
                               f"pass e.g. --{name} {'0.0005' if name == 'lr' else '16'}")

        whole("steps", self.steps, 1)
        positive("lr", self.lr)
        whole("rank", self.rank, 1)
        positive("alpha", self.alpha)
        whole("batch_size", self.batch_size, 1)
        whole("seq_len", self.seq_len, 2)
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise BadInput("no training dataset given", "pass --dataset shakespeare (or set [recovery] dataset)")
        cs = self.checkpoint_seconds
        if isinstance(cs, bool) or not isinstance(cs, int | float) or not math.isfinite(cs) or cs < 0:
            raise BadInput(f"checkpoint_seconds must be a finite number >= 0 (got {cs!r})",
                           "pass --checkpoint-seconds 60 (0 = after every step)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """What decides the result (checkpoint_seconds does not)."""
        return {k: v for k, v in self.to_dict().items() if k != "checkpoint_seconds"}


# ---------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Locations:
    model_dir: Path     # the pruned model read
    work_dir: Path      # the results folder (or `<model>-recovery/`): lock, checkpoint, report
    out_dir: Path       # the merged model written

    @property
    def report_path(self) -> Path:
        return self.work_dir / REPORT

    @property
    def checkpoint_dir(self) -> Path:
        return self.work_dir / CHECKPOINT_DIR


def locate(path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Locations:
    """Resolve RESULTS (a results folder or a saved model folder) to the model, work and output folders."""
    from prune_core.export import RECIPE
    from prune_core.report import is_results_folder

    p = Path(path)
    if not p.exists():
        raise BadInput(f"{p} does not exist", "pass a results folder written by `prune run` (or its model/ folder)")
    if not p.is_dir():
        raise BadInput(f"{p} is not a folder", "pass a results folder written by `prune run` (or its model/ folder)")
    if (p / RECIPE).is_file():
        model_dir = p
        work = p.parent if is_results_folder(p.parent) else p.with_name(f"{p.name}-recovery")
    elif (p / "model" / RECIPE).is_file():
        model_dir, work = p / "model", p
    elif is_results_folder(p):
        raise BadInput(f"{p} holds no saved pruned model (model/{RECIPE})",
                       "save it first: run the session with [output] save_model = true, or use the workbench's "
                       "'Save pruned model'")
    else:
        raise BadInput(f"{p} is neither a results folder nor a saved pruned model (no {RECIPE})",
                       "pass the folder `prune run` printed at the end, or its model/ folder")
    target = Path(out) if out is not None else work / RECOVERED
    if target.resolve() == model_dir.resolve():
        raise BadInput(f"--out {target} is the model being recovered", f"choose another folder, e.g. {work / RECOVERED}")
    if target.exists() and (not target.is_dir() or (any(target.iterdir()) and not (target / RECIPE).is_file())):
        raise BadInput(f"{target} exists and is not a pruned-model folder",
                       "choose a new --out folder (an existing one is only replaced if it holds pruning.json)")
    return Locations(model_dir=model_dir, work_dir=work, out_dir=target)


def session_for(loc: Locations, on_event: EventSink = null_sink) -> Any:
    """The run's session: the results folder's session.toml, else the one recorded in pruning.json."""
    from prune_core.export import read_recipe
    from prune_core.report import is_results_folder
    from sessions import Session, load_with_extras, validate_dict

    if is_results_folder(loc.work_dir):
        return load_with_extras(loc.work_dir / "session.toml")[0]
    recorded = read_recipe(loc.model_dir).get("session")
    if isinstance(recorded, dict):
        try:
            return validate_dict(recorded, source=str(loc.model_dir / "pruning.json"))
        except BadInput as exc:
            on_event(Notice(f"the session recorded in the model folder is not usable ({exc.message}): "
                            "using the schema defaults", "warning", STAGE))
    return Session()


def _differences(stored: Any, current: dict[str, Any]) -> list[str]:
    from prune_core.importance.state import identity_differences

    return identity_differences(stored if isinstance(stored, dict) else {}, current)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def lora_targets(model: nn.Module) -> list[str]:
    """Full paths of the projections LoRA adapts: every module of every layer's group layout."""
    from prune_core.adapters import get_adapter

    adapter = get_adapter(model)
    names: list[str] = []
    for li in range(adapter.num_layers(model)):
        layout = adapter.layout(model, li)
        for block in layout.blocks:
            if block.groups == 0:
                continue  # a removed block: nothing left to adapt
            for module in block.modules():
                path = f"{adapter.layers_path}.{li}.{module}"
                linear = model.get_submodule(path)
                if isinstance(linear, nn.Linear) and linear.in_features > 0 and linear.out_features > 0:
                    names.append(path)
    if not names:
        raise BadInput("the model has no projection left to fine-tune (every block was removed)",
                       "recover a model that was pruned less")
    return list(dict.fromkeys(names))


@dataclass
class TrainOutcome:
    model: nn.Module                # the merged model (LoRA folded into the weights)
    losses: list[float]
    resumed_from: int
    seconds: float
    trainable_parameters: int
    targets: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def train(model: nn.Module, tokens: torch.Tensor, settings: RecoverySettings, *, seed: int,
          store: CheckpointStore | None = None, identity: dict[str, Any] | None = None,
          extra_meta: dict[str, Any] | None = None, resume: Checkpoint | None = None,
          on_event: EventSink = null_sink, should_stop: Callable[[], bool] | None = None) -> TrainOutcome:
    """LoRA fine-tuning of `model` (float32) on `tokens` [steps·batch_size, seq_len]; returns the merged model.

    `resume` (a checkpoint whose identity the caller checked) continues where it stopped; `extra_meta`
    is stored in every checkpoint (the caller's perplexity before).
    """
    from peft import LoraConfig, get_peft_model

    need = settings.steps * settings.batch_size
    if tokens.dim() != 2 or tokens.shape[0] < need or tokens.shape[1] != settings.seq_len:
        raise BadInput(f"training tokens {tuple(tokens.shape)} do not hold {need} windows of {settings.seq_len}",
                       "pass data.calibration_tokens(…, steps × batch_size, seq_len, seed)")
    targets = lora_targets(model)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, bias="none",
                        target_modules=targets, task_type="CAUSAL_LM")
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():  # LoRA A's init from the seed
        # peft reads transformers' deprecated `is_gradient_checkpointing` alias: its FutureWarning is
        # about peft's code, nothing the user can act on
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        torch.manual_seed(seed)  # (the caller's RNG is left alone)
        peft_model = get_peft_model(model, config)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=settings.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0, foreach=False)
    device = named[0][1].device
    identity = identity or {}
    losses: list[float] = []
    start = 0
    seconds_before = 0.0
    if resume is not None and store is not None:
        start, losses = restore_training(resume, store, named, opt, settings.steps, "lora", "LoRA weight")
        rng = resume.tensors.get("rng.torch")
        if rng is not None:
            torch.set_rng_state(rng.to(torch.uint8))
        seconds_before = float(resume.meta.get("seconds", 0.0))
        on_event(Notice(f"resuming the fine-tuning from step {start}/{settings.steps}", "info", STAGE))

    started = time.perf_counter()
    last_save = time.monotonic()

    def checkpoint(next_step: int) -> None:
        if store is None:
            return
        opt_tensors, opt_index = optimizer_state(opt)
        tensors = {f"lora.{n}": p for n, p in named} | opt_tensors | {"rng.torch": torch.get_rng_state()}
        meta = {"identity": identity, "next_step": next_step, "total_steps": settings.steps,
                "losses": losses[:next_step], "optimizer": opt_index,
                "seconds": seconds_before + time.perf_counter() - started, **(extra_meta or {})}
        path = store.save(meta, tensors)
        on_event(Checkpointed(STAGE, next_step, str(path.parent), unit="step"))

    peft_model.train()
    tokens_per_step = settings.batch_size * settings.seq_len
    try:
        for step in range(start, settings.steps):
            lr = lr_at(step, settings)
            for group in opt.param_groups:
                group["lr"] = lr
            ids = tokens[step * settings.batch_size:(step + 1) * settings.batch_size].to(device=device, dtype=torch.long)
            loss = peft_model(input_ids=ids, labels=ids, use_cache=False).loss
            value = optimizer_step(opt, loss, f"the fine-tuning loss at step {step + 1}/{settings.steps}",
                                   "lower --lr (e.g. by 10x), or load the model in float32")
            losses.append(value)
            done = step + 1
            elapsed = time.perf_counter() - started
            rate = (done - start) * tokens_per_step / elapsed if elapsed > 0 else 0.0
            recent = losses[-10:]
            on_event(Progress(STAGE, done, settings.steps, "steps",
                              f"step {done}/{settings.steps} loss {value:.4f} (last 10: {sum(recent) / len(recent):.4f})"
                              f" lr {lr:.2e} {rate:,.0f} tok/s"))
            if done == settings.steps:
                break
            if should_stop is not None and should_stop():
                checkpoint(done)
                raise Interrupted(f"recovery stopped after step {done}/{settings.steps}",
                                  "run the same command again to resume")
            if time.monotonic() - last_save >= settings.checkpoint_seconds:
                checkpoint(done)
                last_save = time.monotonic()
    finally:
        peft_model.eval()
    trainable = sum(p.numel() for _, p in named)
    merged = peft_model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    return TrainOutcome(model=merged, losses=losses, resumed_from=start,
                        seconds=seconds_before + time.perf_counter() - started,
                        trainable_parameters=trainable, targets=targets)


# ---------------------------------------------------------------------------------------------
# The whole command
# ---------------------------------------------------------------------------------------------
@dataclass
class RecoveryResult:
    model_dir: str
    out_dir: str
    report_path: str
    settings: dict[str, Any]
    seed: int
    eval_dataset: str
    before: dict[str, Any]
    after: dict[str, Any]
    losses: list[float]
    resumed_from: int
    seconds: float
    parameters: int
    trainable_parameters: int
    targets: int
    versions: dict[str, str]
    model_sha256: str = ""  # the pruned model it was fine-tuned from (a later run may replace that model)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (f"perplexity {self.before['ppl']:.3f} -> {self.after['ppl']:.3f} on {self.eval_dataset} "
                f"({self.after['tokens']:,} held-out tokens) after {self.settings['steps']} LoRA steps")


def _stage(on_event: EventSink, name: str, description: str, fn: Callable[[], Any],
           summary: Callable[[Any], str] = lambda _: "") -> Any:
    on_event(StageStarted(name, description))
    t0 = time.perf_counter()
    value = fn()
    on_event(StageDone(name, time.perf_counter() - t0, summary=summary(value)))
    return value


def recover(path: str | os.PathLike[str], *, session: Any = None, out: str | os.PathLike[str] | None = None,
            fresh: bool = False, device: str | None = None, on_event: EventSink = null_sink,
            should_stop: Callable[[], bool] | None = None, **overrides: Any) -> RecoveryResult:
    """`prune recover`: fine-tune, merge, save RESULTS/recovered and RESULTS/recovery.json (see the docstring).

    `session` gives the [recovery] defaults, the seed and the [evaluation] settings (default: the
    run's own); `overrides` are RecoverySettings fields (None = the session's value).
    """
    import peft
    import transformers

    from prune_core import lock
    from prune_core.data import calibration_tokens, evaluation_tokens, token_fingerprint
    from prune_core.evaluate import perplexity
    from prune_core.export import WEIGHTS, load_pruned, read_recipe, save_pruned
    from prune_core.models import resolve_device

    loc = locate(path, out)
    if session is None:
        session = session_for(loc, on_event)
    settings = RecoverySettings.from_session(session, **overrides)
    settings.validate()
    seed = int(session.session.seed)
    eval_ds = session.eval_dataset
    with lock.hold(loc.work_dir, on_event=on_event):
        store = CheckpointStore(loc.checkpoint_dir)
        if fresh and store.folder.exists():
            store.clear()
        recipe = read_recipe(loc.model_dir)
        dev = resolve_device(device or session.model.device)
        model, tokenizer = _stage(on_event, "recovery_model", f"loading {loc.model_dir}",
                                  lambda: load_pruned(loc.model_dir, device=dev, dtype="float32"))
        if tokenizer is None:
            raise BadInput(f"{loc.model_dir} holds no tokenizer files", "save the model again with `prune run`")
        tokens = _stage(on_event, "recovery_data", f"{settings.steps} × {settings.batch_size} windows of "
                        f"{settings.seq_len} tokens from the calibration split of {settings.dataset}",
                        lambda: calibration_tokens(tokenizer, settings.dataset, settings.steps * settings.batch_size,
                                                   settings.seq_len, seed, on_event,
                                                   keys=("recovery.steps × recovery.batch_size", "recovery.seq_len")))
        eval_tokens = evaluation_tokens(tokenizer, eval_ds, session.evaluation.max_tokens, on_event)
        versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
        identity = {"model_sha256": file_sha256(loc.model_dir / WEIGHTS), "settings": settings.identity(),
                    "seed": seed, "tokens_sha256": token_fingerprint(tokens), "versions": versions}
        ckpt = store.load()
        if ckpt is not None:
            diffs = _differences(ckpt.meta.get("identity"), identity)
            if diffs:
                raise BadInput(f"the recovery checkpoint in {store.folder} was made for other inputs "
                               f"({'; '.join(diffs)})",
                               "run with --fresh to start over, or restore the settings it was made with to resume")

        def evaluate(m: nn.Module, name: str) -> dict[str, Any]:
            return _stage(on_event, name, f"perplexity on the evaluation split of {eval_ds}",
                          lambda: perplexity(m, eval_tokens, seq_len=session.evaluation.seq_len, on_event=on_event,
                                             should_stop=should_stop, stage=name),
                          lambda r: f"ppl {r['ppl']:.3f}")

        before = ckpt.meta.get("ppl_before") if ckpt is not None else None
        if not (isinstance(before, dict) and isinstance(before.get("ppl"), int | float)):
            before = evaluate(model, "recovery_eval_before")
        on_event(StageStarted(STAGE, f"LoRA r={settings.rank} on {settings.steps} steps", settings.steps))
        t0 = time.perf_counter()
        outcome = train(model, tokens, settings, seed=seed, store=store, identity=identity,
                        extra_meta={"ppl_before": before}, resume=ckpt, on_event=on_event, should_stop=should_stop)
        tail = outcome.losses[-10:]
        on_event(StageDone(STAGE, time.perf_counter() - t0,
                           summary=f"loss {outcome.losses[0]:.4f} -> {sum(tail) / len(tail):.4f} (mean of last "
                                   f"{len(tail)})"))
        merged = outcome.model
        saved_dtype = recipe.get("dtype", "float32")
        if saved_dtype != "float32":
            merged = merged.to(getattr(torch, saved_dtype))
        after = evaluate(merged, "recovery_eval_after")
        kept = {int(e["layer"]): {"attention": e["attention"]["kept"], "mlp": e["mlp"]["kept"]} for e in recipe["layers"]}
        source = {**(recipe.get("source") or {}), "recovered_from": str(loc.model_dir),
                  "recovery": {**settings.to_dict(), "seed": seed}}
        _stage(on_event, "recovery_save", f"saving the merged model to {loc.out_dir}",
               lambda: save_pruned(merged, tokenizer, loc.out_dir, kept=kept, source=source,
                                   session=recipe.get("session") or {}))
        result = RecoveryResult(
            model_dir=str(loc.model_dir), out_dir=str(loc.out_dir), report_path=str(loc.report_path),
            settings=settings.to_dict(), seed=seed, eval_dataset=eval_ds, before=before, after=after,
            losses=outcome.losses, resumed_from=outcome.resumed_from, seconds=outcome.seconds,
            parameters=sum(p.numel() for p in merged.parameters()),
            trainable_parameters=outcome.trainable_parameters, targets=len(outcome.targets), versions=versions,
            model_sha256=identity["model_sha256"])
        atomic.write_json(loc.report_path, result.to_dict())
        store.clear()
    return result


def stale_recovery(results_dir: Path) -> str | None:
    """A warning when RESULTS/recovered was fine-tuned from another model than the one RESULTS/model holds.

    A run that saves a new pruned model into a results folder leaves an earlier `prune recover`'s output
    alone (it is the user's), so the workbench says it no longer matches. Reads the sha256 the results
    manifest already holds (no rehash); silent when either record is missing or unreadable.
    """
    from prune_core.export import WEIGHTS
    from prune_core.report import recorded_sha256

    folder = Path(results_dir)
    try:
        recovered = json.loads((folder / REPORT).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(recovered, dict):
        return None
    was = recovered.get("model_sha256")
    now = recorded_sha256(folder, f"model/{WEIGHTS}")
    source = Path(str(recovered.get("model_dir", "")))
    if not was or not now or was == now or source.resolve() != (folder / "model").resolve():
        return None
    return (f"{folder / RECOVERED} was fine-tuned from the previous pruned model, not the one this run saved; "
            f"run `prune recover {folder}` again to recover the new one")
