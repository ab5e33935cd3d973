"""What each pipeline stage computes, and how its result is saved and loaded (`pipeline.py` declares them).

Each function takes a `pipeline.Ctx` (the session, the upstream values, where to checkpoint, the
event sink) and returns the stage's value. Values are plain objects the next stages read; the ones
worth keeping on disk have a `save_*` / `load_*` pair that the pipeline calls through `cache.py`.
Nothing here orders stages or decides what to recompute: that is the pipeline's job.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from prune_core import atomic
from prune_core.errors import BadInput
from prune_core.events import EventSink, Notice
from sessions import Session, check_against_model
from sessions.errors import SessionError

if TYPE_CHECKING:
    from prune_core.verify import Trial


# ---------------------------------------------------------------------------------------------- context
@dataclass
class Ctx:
    """What a stage's compute function sees."""

    session: Session
    stage: str
    key: str
    values: dict[str, Any]
    results_dir: Path | None
    checkpoint_dir: Path | None
    on_event: EventSink
    should_stop: Callable[[], bool]
    in_place: bool
    try_fix: Callable[[Session], Trial | None] | None = None
    summary: str = ""
    result: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- values
@dataclass
class ModelValue:
    """The loaded model with what every later stage reads off it."""

    loaded: Any  # prune_core.models.LoadedModel
    adapter: Any
    total_parameters: int
    facts: dict[str, Any]

    @cached_property
    def costs(self) -> Any:
        """allocation.GroupCosts of the (unpruned) model, read when an allocation needs them."""
        from prune_core.allocation import GroupCosts

        return GroupCosts.from_model(self.loaded.model, self.adapter)

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


@dataclass
class Calibration:
    """Calibration windows: `tokens` feed the importance pass, `proxy` are held out for the proxy loss."""

    tokens: torch.Tensor
    proxy: torch.Tensor
    fingerprint: str


@dataclass
class Pruned:
    """The model with the allocation physically removed (and compensated)."""

    model: Any
    report: Any  # surgery.SurgeryReport
    in_place: bool
    compensate: str
    distill: dict[str, Any] | None = None  # the distill stage's figures (steps, losses, seconds) when it ran


@dataclass
class Diagnosis:
    findings: list[Any] = field(default_factory=list)  # diagnosis.Finding, worst first


# ---------------------------------------------------------------------------------------------- model
def load_model(ctx: Ctx) -> ModelValue:
    """Load the model (nothing is written before it and the calibration data succeed)."""
    from prune_core.adapters import get_adapter
    from prune_core.models import resolve_model

    m = ctx.session.model
    loaded = resolve_model(m.id, revision=m.revision, dtype=m.dtype, device=m.device,
                           trust_remote_code=m.trust_remote_code, on_event=ctx.on_event)
    adapter = get_adapter(loaded.model)
    problems = check_against_model(ctx.session, adapter.num_layers(loaded.model))
    if problems:
        raise SessionError(problems, source="session")
    total = sum(p.numel() for p in loaded.model.parameters())
    try:
        facts = dict(adapter.describe(loaded.model))
        ctx.summary = (f"{facts['family']}, {facts['layers']} layers, {facts['heads']} heads / "
                       f"{facts['kv_heads']} KV, {facts['prunable_parameters']:,} prunable parameters")
    except AttributeError:  # an already pruned model whose first layer lost a whole block
        facts = {"family": loaded.model.config.model_type, "layers": adapter.num_layers(loaded.model),
                 "total_parameters": total}
        ctx.summary = f"{facts['family']}, {facts['layers']} layers (pruned), {total:,} parameters"
    value = ModelValue(loaded=loaded, adapter=adapter, total_parameters=total, facts=facts)
    ctx.result = {k: v for k, v in facts.items() if isinstance(v, int | str)}
    return value


def model_identity(value: ModelValue) -> str:
    return f"{value.loaded.fingerprint}:{next(value.model.parameters()).dtype}"


# ---------------------------------------------------------------------------------------------- data
def load_calibration(ctx: Ctx) -> Calibration:
    from prune_core.data import calibration_tokens, token_fingerprint

    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    extra = s.data.proxy_samples
    windows = calibration_tokens(mv.tokenizer, s.data.dataset, s.data.num_samples + extra, s.data.seq_len,
                                 s.session.seed, on_event=ctx.on_event)
    # the first num_samples windows are exactly those of a draw of num_samples (sequential draws)
    tokens, proxy = windows[: s.data.num_samples].contiguous(), windows[s.data.num_samples:].contiguous()
    generated = s.data.generated_samples
    if generated:
        from prune_core.selfgen import generated_windows

        gen = generated_windows(mv.model, mv.tokenizer, generated, s.data.seq_len, s.session.seed,
                                on_event=ctx.on_event, should_stop=ctx.should_stop, stage=ctx.stage)
        tokens = torch.cat([tokens, gen.to(tokens.dtype)]).contiguous()
    fingerprint = token_fingerprint(tokens)
    if ctx.results_dir is not None:
        atomic.write_with(ctx.results_dir / "state" / "calibration_tokens.safetensors", lambda p: save_file(
            {"input_ids": tokens, "proxy_ids": proxy}, str(p),
            metadata={"sha256": fingerprint, "dataset": s.data.dataset, "seed": str(s.session.seed),
                      "generated": str(generated)}))
    gen_note = f" + {generated} generated by the model" if generated else ""
    ctx.summary = (f"{s.data.num_samples}{gen_note} × {s.data.seq_len} tokens (+{extra} held out for the proxy), "
                   f"sha256 {fingerprint[:12]}…")
    ctx.result = {"windows": s.data.num_samples, "generated_windows": generated, "proxy_windows": extra,
                  "seq_len": s.data.seq_len, "sha256": fingerprint}
    return Calibration(tokens=tokens, proxy=proxy, fingerprint=fingerprint)


# ---------------------------------------------------------------------------------------------- importance
def importance_identity(ctx: Ctx) -> dict[str, Any]:
    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    return {
        "model": s.model.id, "revision": s.model.revision, "dtype": s.model.dtype,
        "model_fingerprint": mv.loaded.fingerprint, "dataset": s.data.dataset,
        "data_fingerprint": ctx.values["calibration"].fingerprint, "num_samples": s.data.num_samples,
        "generated_samples": s.data.generated_samples,
        "seq_len": s.data.seq_len, "seed": s.session.seed, "batch_size": s.data.batch_size,
        "method": s.importance.method, "aggregation": s.importance.aggregation,
        "fisher_scale": s.importance.fisher_scale,
    }


def compute_importance(ctx: Ctx) -> Any:
    from prune_core.importance import run_importance

    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    result = run_importance(
        mv.model, mv.adapter, ctx.values["calibration"].tokens,
        method=s.importance.method, aggregation=s.importance.aggregation,
        fisher_scale=s.importance.fisher_scale, batch_size=s.data.batch_size,
        hessian_device=s.importance.hessian_device, gradient_checkpointing=s.importance.gradient_checkpointing,
        checkpoint_dir=ctx.checkpoint_dir, checkpoint_seconds=s.importance.checkpoint_seconds,
        identity=importance_identity(ctx), on_event=ctx.on_event, should_stop=ctx.should_stop,
        stage=ctx.stage, stats_sample=s.importance.stats_sample,
        stats_every=s.importance.stats_every, recorder=_stream_recorder(ctx),
    )
    ctx.summary = f"{result.batches} batches, {result.tokens:,} tokens"
    ctx.result = {"method": result.method, "batches": result.batches, "tokens": result.tokens,
                  "seconds": round(float(result.seconds), 3)}
    return result


def _stream_recorder(ctx: Ctx) -> Any:
    """A recorder of the dense model's per-layer outputs for the reconstruction's error feedback
    (prune_core/dense_stream.py), when this session will use them and they fit the memory budget; the
    reconstruction computes them itself otherwise."""
    from prune_core import distributed
    from prune_core.dense_stream import StreamRecorder, fitting_mids
    from prune_core.importance.registry import get_method

    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    param = next(mv.model.parameters())
    if (s.pruning.compensate != "reconstruct" or s.pruning.error_feedback <= 0 or param.device.type != "cpu"
            or not get_method(s.importance.method).needs_calibration
            or not getattr(mv.adapter, "residual_outputs", True)):
        return None
    tokens = ctx.values["calibration"].tokens
    windows = math.ceil(tokens.shape[0] / distributed.world().size)
    mids = fitting_mids(windows, tokens.shape[1], mv.model.get_input_embeddings().embedding_dim,
                        mv.adapter.num_layers(mv.model), param.element_size(), s.pruning.budget()[0] != "mlp")
    return None if mids is None else StreamRecorder(tokens, s.data.batch_size, mids=mids)


def save_importance(folder: Path, value: Any) -> None:
    value.save(folder)


def load_importance(folder: Path) -> Any:
    from prune_core.importance import ImportanceResult

    return ImportanceResult.load(folder)


# ---------------------------------------------------------------------------------------------- block losses
def compute_block_losses(ctx: Ctx) -> Any:
    from prune_core.data import calibration_tokens
    from prune_core.importance import block_importance

    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    tokens = calibration_tokens(mv.tokenizer, s.data.dataset, s.correction.samples, s.correction.seq_len,
                                s.session.seed, keys=("correction.samples", "correction.seq_len"))
    block = block_importance(mv.model, mv.adapter, tokens, batch_size=min(s.data.batch_size, len(tokens)),
                             on_event=ctx.on_event, should_stop=ctx.should_stop, stage=ctx.stage)
    ctx.summary = f"base loss {block.base_loss:.4f}"
    ctx.result = {"base_loss": block.base_loss}
    return block


def save_json_value(folder: Path, value: Any) -> None:
    data = value.to_dict() if hasattr(value, "to_dict") else value
    atomic.write_json(folder / "value.json", data)


def load_block_losses(folder: Path) -> Any:
    from prune_core.importance import BlockImportance

    return BlockImportance.from_dict(json.loads((folder / "value.json").read_text(encoding="utf-8")))


def load_json_value(folder: Path) -> Any:
    return json.loads((folder / "value.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- allocation
def compute_allocation(ctx: Ctx) -> Any:
    from prune_core.allocation import allocate

    mv: ModelValue = ctx.values["model"]
    alloc = allocate(ctx.values["importance"], mv.costs, ctx.session, block=ctx.values.get("block_losses"))
    if not alloc.reachable:
        ctx.on_event(Notice(alloc.message, stage=ctx.stage))
    elif alloc.achieved_ratio > alloc.target_ratio + 0.01:  # min_rate's floors alone remove more than asked
        ctx.on_event(Notice(f"{alloc.message}; lower [pruning] min_rate (or raise ratio) to prune what the "
                            "ratio asks", level="warning", stage=ctx.stage))
    p = ctx.session.pruning
    if p.early_layers == 0 and p.early_max_rate < 1.0:
        ctx.on_event(Notice(f"[pruning] early_max_rate = {p.early_max_rate:g} has no effect while early_layers = 0; "
                            "set early_layers to the number of first layers it should limit", level="warning",
                            stage=ctx.stage))
    blocks, mode = p.budget()
    ctx.summary = f"{alloc.achieved_ratio:.1%} of prunable parameters removed" + (
        f" (allocation auto: {mode}, blocks {blocks})" if p.allocation == "auto" else "")
    ctx.result = {"target_ratio": alloc.target_ratio, "achieved_ratio": alloc.achieved_ratio,
                  "blocks": blocks, "allocation": mode,
                  "removed_parameters": int(alloc.removed_parameters), "mask_sha256": alloc.mask_sha256,
                  "reachable": bool(alloc.reachable)}
    return alloc


# ---------------------------------------------------------------------------------------------- proxy
def compute_proxy_base(ctx: Ctx) -> dict[str, float]:
    from prune_core.proxy import proxy_loss

    mv: ModelValue = ctx.values["model"]
    proxy = ctx.values["calibration"].proxy
    loss = proxy_loss(mv.model, mv.adapter, proxy, None, batch_size=ctx.session.data.batch_size)
    ctx.summary = f"dense proxy loss {loss:.4f} on {proxy.shape[0]} held-out windows"
    ctx.result = {"loss": loss}
    return {"loss": loss, "windows": int(proxy.shape[0])}


def compute_proxy(ctx: Ctx) -> dict[str, float]:
    from prune_core.proxy import proxy_loss

    mv: ModelValue = ctx.values["model"]
    proxy = ctx.values["calibration"].proxy
    alloc = ctx.values["allocation"]
    loss = proxy_loss(mv.model, mv.adapter, proxy, alloc.pruned_indices(), batch_size=ctx.session.data.batch_size)
    dense = float(ctx.values["proxy_base"]["loss"])
    value = {"loss": loss, "dense": dense, "windows": int(proxy.shape[0]), "seq_len": int(proxy.shape[1])}
    ctx.summary = f"proxy loss {loss:.4f} (dense {dense:.4f})"
    ctx.result = dict(value)
    return value


def compute_proxy_final(ctx: Ctx) -> dict[str, float]:
    """The same held-out windows through the model the run hands on (after compensation and distillation).

    The allocation's proxy masks the removed groups of the dense model, which is what a what-if can
    afford; this one sees what the surgery's compensation and the distillation won back (or lost).
    """
    from prune_core.proxy import proxy_loss

    mv: ModelValue = ctx.values["model"]
    proxy = ctx.values["calibration"].proxy
    loss = proxy_loss(final_model(ctx).model, mv.adapter, proxy, None, batch_size=ctx.session.data.batch_size)
    masked_loss = (ctx.values.get("proxy") or {}).get("loss")
    ctx.summary = (f"proxy loss of the final model {loss:.4f}"
                   + (f" (masked, uncompensated {float(masked_loss):.4f})" if masked_loss is not None else ""))
    ctx.result = {"loss": loss}
    return {"loss": loss}


# ---------------------------------------------------------------------------------------------- diagnosis
def compute_diagnosis(ctx: Ctx) -> Diagnosis:
    """Findings; each fix is tried in a what-if and scored by the proxy before it is recommended."""
    from prune_core.diagnosis import diagnose
    from prune_core.verify import verify_findings

    s = ctx.session
    imp = ctx.values["importance"]
    alloc = ctx.values["allocation"]
    findings = diagnose(stats=imp.stats, stats_label=imp.stats_label, summary=alloc.summary, session=s,
                        second_order_share=second_order_share(imp))
    proxy = ctx.values.get("proxy")
    if proxy is not None and ctx.try_fix is not None:
        findings = verify_findings(findings, base_loss=float(proxy["loss"]), session=s, score=ctx.try_fix,
                                   base_achieved=float(alloc.achieved_ratio))
    worst = findings[0].severity if findings else "none"
    ctx.summary = f"{len(findings)} findings (worst: {worst})"
    ctx.result = {"findings": len(findings), "worst": worst}
    return Diagnosis(findings=findings)


def second_order_share(imp: Any) -> float | None:
    fo = getattr(imp, "first_order", None)
    if not fo:
        return None
    total = float(imp.attention.sum() + imp.mlp.sum())
    first = float(fo["attention"].sum() + fo["mlp"].sum())
    return (total - first) / total if total > 0 else 0.0


# ---------------------------------------------------------------------------------------------- evaluation
def load_eval_data(ctx: Ctx) -> torch.Tensor:
    from prune_core.data import evaluation_tokens

    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    tokens = evaluation_tokens(mv.tokenizer, s.eval_dataset, s.evaluation.max_tokens, on_event=ctx.on_event)
    ctx.summary = f"{tokens.numel():,} held-out tokens of {s.eval_dataset}"
    ctx.result = {"tokens": int(tokens.numel()), "dataset": s.eval_dataset}
    return tokens


def _perplexity(ctx: Ctx, model: Any) -> dict[str, Any]:
    from prune_core.evaluate import perplexity

    s = ctx.session
    result = perplexity(model, ctx.values["eval_data"], seq_len=s.evaluation.seq_len, on_event=ctx.on_event,
                        should_stop=ctx.should_stop, stage=ctx.stage)
    result = {**result, "dataset": s.eval_dataset, "max_tokens": s.evaluation.max_tokens}
    ctx.summary = f"PPL {result['ppl']:.3f} ({result['tokens']:,} tokens, seq_len {result['seq_len']})"
    ctx.result = dict(result)
    return result


def eval_before(ctx: Ctx) -> dict[str, Any]:
    return _perplexity(ctx, ctx.values["model"].model)


def final_model(ctx: Ctx) -> Pruned:
    """The pruned model the run hands on: the distilled one when the distill stage ran, else the surgery's."""
    return ctx.values.get("distill") or ctx.values["surgery"]


def eval_after(ctx: Ctx) -> dict[str, Any]:
    return _perplexity(ctx, final_model(ctx).model)


# ---------------------------------------------------------------------------------------------- surgery
def compute_surgery(ctx: Ctx) -> Pruned:
    """Remove the allocation's groups from the model (a copy unless the run owns the model) and compensate.

    Under torchrun a reconstructing surgery runs on every rank (`pipeline._is_collective`): the other
    ranks have no allocation, rank 0 broadcasts its groups, and the reconstruction all-reduces its sums.
    """
    from prune_core import distributed
    from prune_core.surgery import apply_pruning

    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    alloc = ctx.values.get("allocation")
    in_place = ctx.in_place and not s.distill.steps  # distillation needs the dense model as its teacher
    model = mv.model if in_place else copy.deepcopy(mv.model)
    pruned = alloc.pruned_indices() if alloc is not None else None
    world = distributed.world()
    if world.active:  # collective only when reconstructing (otherwise rank 0 runs it alone, released)
        pruned = world.broadcast(pruned)
    if pruned is None:
        raise BadInput("the surgery needs the allocation's groups", "run the allocation stage first")
    mode = s.pruning.compensate
    if mode == "reconstruct":
        from prune_core.compensation.reconstruct import prune_and_reconstruct

        report = prune_and_reconstruct(model, mv.adapter, pruned, ctx.values["calibration"].tokens,
                                       ridge=s.pruning.ridge, batch_size=s.data.batch_size,
                                       error_feedback=s.pruning.error_feedback,
                                       dense_stream=getattr(ctx.values.get("importance"), "dense_stream", None),
                                       on_event=ctx.on_event, should_stop=ctx.should_stop, stage=ctx.stage)
        # the recorded stream (up to min(2 GiB, RAM / 8)) is not held through distillation or by a memo's
        # importance value: a later what-if's reconstruction runs the dense layers itself
        if getattr(ctx.values.get("importance"), "dense_stream", None) is not None:
            ctx.values["importance"].dense_stream = None
    else:
        means = None
        if mode == "bias":
            imp = ctx.values["importance"]
            if not getattr(imp, "input_sums", None) or int(getattr(imp, "input_tokens", 0)) == 0:
                raise BadInput(f"compensate = \"bias\" needs input means, which the {imp.method} pass does not record",
                               "use compensate = \"reconstruct\" or \"none\" with this importance method")
            n = max(int(imp.input_tokens), 1)
            means = {k: v / n for k, v in imp.input_sums.items()}
        report = apply_pruning(model, mv.adapter, pruned, input_means=means)
    ctx.summary = f"{report.params_before:,} → {report.params_after:,} parameters ({mode})"
    ctx.result = {"params_before": report.params_before, "params_after": report.params_after, "compensate": mode}
    return Pruned(model=model, report=report, in_place=in_place, compensate=mode)


def compute_distill(ctx: Ctx) -> Pruned:
    """Train the surgery's model toward the dense model's next-token distributions (compensation/distill.py).

    A run that owns the model trains the surgery's copy in place; a what-if (memo) trains a copy, so the
    memo's surgery stays as it was.
    """
    from prune_core.compensation.distill import DistillSettings, distill
    from prune_core.recovery_checkpoint import CheckpointStore

    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    pruned: Pruned = ctx.values["surgery"]
    model = pruned.model if ctx.in_place else copy.deepcopy(pruned.model)
    d = s.distill
    # a writing run checkpoints into the stage's folder (keyed by its inputs); a what-if does not
    store = CheckpointStore(ctx.checkpoint_dir) if ctx.results_dir is not None and ctx.checkpoint_dir else None
    # the calibration tokens are the dataset's windows first, then the generated ones (load_calibration)
    report = distill(model, mv.model, mv.adapter, ctx.values["calibration"].tokens,
                     DistillSettings(steps=d.steps, lr=d.lr, batch_size=d.batch_size, train=d.train,
                                     ce_weight=d.ce_weight,
                                     ce_rows=s.data.num_samples if d.ce_windows == "dataset" else None),
                     seed=s.session.seed, on_event=ctx.on_event, should_stop=ctx.should_stop, stage=ctx.stage,
                     store=store, checkpoint_seconds=d.checkpoint_seconds)
    if store is not None:  # this one, and any of other distill settings
        for folder in store.folder.parent.glob("distill-*"):
            CheckpointStore(folder).clear()
    first, last = report.losses[0], sum(report.losses[-8:]) / len(report.losses[-8:])
    ctx.summary = (f"{d.steps} steps on {report.trainable_parameters:,} parameters ({d.train}): "
                   f"loss {first:.4f} → {last:.4f}")
    ctx.result = {"steps": d.steps, "train": d.train, "trainable_parameters": report.trainable_parameters,
                  "loss_first": first, "loss_last": last, "seconds": report.seconds}
    return Pruned(model=model, report=pruned.report, in_place=ctx.in_place, compensate=pruned.compensate,
                  distill=dict(ctx.result))


def save_model(ctx: Ctx) -> str:
    from prune_core.export import save_pruned

    if ctx.results_dir is None:
        raise BadInput("saving the model needs a results folder", "run with an output folder")
    s = ctx.session
    mv: ModelValue = ctx.values["model"]
    pruned = final_model(ctx)
    from prune_core.report import staging_dir

    target = staging_dir(ctx.results_dir) / "model"  # swapped in with the rest of the results (report.py)
    save_pruned(pruned.model, mv.tokenizer, target, kept=pruned.report.kept,
                source={"id": s.model.id, "revision": s.model.revision, "fingerprint": mv.loaded.fingerprint},
                session=s.resolved().to_dict())
    ctx.summary = str(target)
    ctx.result = {"model_dir": str(target)}
    return str(target)


def read_calibration_file(path: Path) -> torch.Tensor:
    return load_file(str(path))["input_ids"]


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
