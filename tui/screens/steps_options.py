"""Set-up steps 3 to 5: importance method, sequence length and samples (with an estimate), pruning."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Collapsible, Static

from prune_core.errors import BadInput
from prune_core.importance.registry import METHODS as IMPORTANCE_METHODS
from sessions import Session
from tui.estimate import Estimate, Geometry, around_pass, estimate, human_bytes, human_count, human_seconds
from tui.screens.steps_base import Step, value_at
from tui.state import WorkbenchState
from tui.widgets.fields import FieldSpec, MarkedRadioButton, PickedRadioSet, control_id

METHODS = tuple((spec.key, spec.description) for spec in IMPORTANCE_METHODS.values())  # the registry's

METHOD_FIELDS = (
    FieldSpec("importance.aggregation", "aggregation", "choice",
              "element: per weight; vector: per group"),
    FieldSpec("importance.fisher_scale", "Fisher scale", "choice",
              "taylor_2nd: Fisher ÷ tokens or not"),
    FieldSpec("importance.hessian_device", "Fisher on", "choice",
              "taylor_2nd: where the Fisher lives"),
)

LENGTH_FIELDS = (
    FieldSpec("data.seq_len", "seq_len", "int", "tokens per calibration window"),
    FieldSpec("data.num_samples", "num_samples", "int", "calibration windows"),
    FieldSpec("data.generated_samples", "generated", "int", "+ windows the model writes itself"),
    FieldSpec("data.batch_size", "batch_size", "int", "windows per gradient batch"),
    FieldSpec("importance.gradient_checkpointing", "grad. checkpointing", "bool", "less memory, ~1/3 more time"),
    FieldSpec("session.seed", "seed", "int", "which windows are drawn"),
)

PRUNING_FIELDS = (
    FieldSpec("pruning.ratio", "ratio", "float", "share of prunable params to remove"),
    FieldSpec("pruning.min_rate", "min rate", "float", "lowest pruned share of any block"),
    FieldSpec("pruning.max_rate", "max rate", "float", "highest pruned share of any block"),
    FieldSpec("pruning.protect_layers", "protect layers", "ints", "never pruned, e.g. 0, 1, -1 (-1 = last)",
              placeholder="none"),
    FieldSpec("pruning.blocks", "blocks", "choice", "what is pruned"),
    FieldSpec("pruning.allocation", "budget", "choice", "global, same rate per layer, hybrid, or auto (by ratio)"),
    FieldSpec("pruning.compensate", "compensate", "choice", "reconstruct: refit what stays"),
)

PRUNING_ADVANCED = (
    FieldSpec("correction.temperature", "correction T", "float", "block-level exponent (0 = off)"),
    FieldSpec("correction.tau", "correction tau", "float", "layer-level exponent (0 = off)"),
    FieldSpec("correction.samples", "correction samples", "int", "windows for block losses"),
    FieldSpec("normalization.level", "normalize", "choice", "none, per layer or per block"),
    FieldSpec("normalization.method", "norm. method", "choice", "how scores are rescaled"),
    FieldSpec("normalization.clip", "clip", "floats", "percentiles low, high e.g. 1, 99", placeholder="none"),
    FieldSpec("pruning.early_layers", "early layers", "int", "first N layers use early max rate"),
    FieldSpec("pruning.early_max_rate", "early max rate", "float", "max rate of those layers"),
    FieldSpec("pruning.depth_weight", "depth weight", "float", "favour early layers ×(1+(1-l/L)·w)"),
    FieldSpec("pruning.depth_ramp", "depth ramp", "float", "uniform: rates from (1-d) to (1+d)× with depth"),
    FieldSpec("pruning.global_share", "global share", "float", "uniform: rates toward the global ranking's (0-1)"),
    FieldSpec("pruning.ridge", "ridge", "float", "reconstruct: pull toward the original weights"),
    FieldSpec("pruning.error_feedback", "error feedback", "float",
              "reconstruct: share of earlier layers' error each refit corrects (0–1)"),
    FieldSpec("pruning.attention_weight", "attention weight", "float", ">1 prunes attention less"),
    FieldSpec("distill.steps", "distill steps", "int", "then train toward the dense model (0 = off)"),
    FieldSpec("distill.lr", "distill lr", "float", "learning rate of those steps"),
    FieldSpec("distill.ce_weight", "distill CE weight", "float", "+ this × the text's own next-token loss"),
    FieldSpec("distill.ce_windows", "distill CE on", "choice", "all windows, or the dataset's only"),
)


class MethodStep(Step):
    key = "method"
    title = "3 Method"

    def compose(self) -> ComposeResult:
        yield self.intro("How each group's importance is scored (arrows to move, Enter or space to pick).")
        current = value_at(self.state.form_data, "importance.method") or "taylor"
        with PickedRadioSet(id=control_id("importance.method")):
            for key, desc in METHODS:
                yield MarkedRadioButton(f"{key:<11} {desc}", value=key == current, id=f"method-{key}")
        yield Static("", id="method-error", classes="field-error-line")
        for spec in METHOD_FIELDS:
            yield self.row(spec)

    def on_form_changed(self) -> None:
        msg = next((m for p, m in self.state.problems if p == "importance.method"), "")
        self.query_one("#method-error", Static).update(Text(f"✗ {msg}", style="red") if msg else "")


def geometry_for(state: WorkbenchState) -> Geometry | None:
    """Exact geometry once the model was inspected; a guess from the built-in size otherwise."""
    info = state.model_info
    spec = value_at(state.form_data, "model.id")
    if info is not None and info.spec == spec and info.total_parameters:
        vocab = len(info.tokenizer) if info.tokenizer is not None else 32000
        return Geometry(parameters=info.total_parameters, prunable=info.prunable_parameters, layers=info.layers,
                        hidden=info.hidden_size, heads=info.heads, vocab=vocab)
    for m in state.builtin_models or []:
        if m.get("key") == spec and isinstance(m.get("parameters"), int | float):
            return Geometry.guess(int(m["parameters"]))
    return None


def _about(seconds: float) -> str:
    when = human_seconds(seconds)
    return when if when.startswith("<") else "~" + when


class LengthStep(Step):
    key = "length"
    title = "4 Length"

    def compose(self) -> ComposeResult:
        yield self.intro("Calibration windows: tokens seen = seq_len × num_samples. The estimate updates as you type.")
        for spec in LENGTH_FIELDS:
            yield self.row(spec)
        yield Static("", id="estimate")

    def on_mount(self) -> None:
        self.on_form_changed()

    def on_form_changed(self) -> None:
        self.query_one("#estimate", Static).update(self.render_estimate())

    def render_estimate(self) -> Any:
        state = self.state
        data = state.form_data
        geo = geometry_for(state)
        if geo is None:
            return Text("Estimate: inspect the model in step 1 to see time and memory.", style="dim")
        keys = ("data.seq_len", "data.num_samples", "data.generated_samples", "data.batch_size", "distill.steps",
                "distill.batch_size")
        try:
            given = {k: int(v) for k in keys if (v := value_at(data, k)) is not None}
            checked = Session().with_updates(given)  # the session's own ranges (seq_len >= 2, one window, …)
        except (TypeError, ValueError, BadInput):
            return Text("Estimate: enter whole numbers the session accepts above (see the field errors).",
                        style="dim")
        seq, gen = checked.data.seq_len, checked.data.generated_samples
        steps, dbatch = checked.distill.steps, checked.distill.batch_size
        kw = {"method": str(value_at(data, "importance.method") or "taylor"),
              "num_samples": checked.data.num_samples + gen, "batch_size": checked.data.batch_size, "dtype": str(value_at(data, "model.dtype") or "float32"),
              "gpu": state.gpu_for(str(value_at(data, "model.device") or "auto")), "cpu_flops": state.cpu_flops,
              "gradient_checkpointing": bool(value_at(data, "importance.gradient_checkpointing"))}
        speed = state.speeds.get(state.speed_key(str(value_at(data, "model.id") or ""), str(kw["method"]),
                                                 str(value_at(data, "model.device") or "auto")))
        kw["measured"] = speed
        lengths = sorted({128, 256, 512, seq})
        rows: list[Estimate] = [estimate(geo, seq_len=s, **kw) for s in lengths]  # type: ignore[arg-type]
        table = Table(title=None, box=None, padding=(0, 2), show_edge=False)
        for col in ("seq_len", "tokens", "time", "memory", ""):
            table.add_column(col, justify="right" if col else "left")
        for e in rows:
            mark = "◀ chosen" if e.seq_len == seq else ""
            table.add_row(str(e.seq_len), human_count(e.tokens), _about(e.seconds),
                          "~" + human_bytes(e.memory_bytes), mark, style="bold" if mark else "")
        where = "GPU (assumed)" if kw["gpu"] else ("CPU (measured)" if state.cpu_flops else "CPU (assumed)")
        if speed is not None:
            where = f"this machine, calibrated on the last pass ({speed[0]:,.0f} tokens/s)"
        note = Text.assemble(
            ("Estimate", "bold"), f" for {kw['method']} on {where}{'' if geo.exact else ', model size guessed'}:\n",
            ("longer windows see more context (steadier importance) but time grows with tokens and memory with "
             "seq_len (attention with seq_len²); 128 is quick, 256 a good default, 512 for long-context models.",
             "dim"))
        from rich.console import Group

        chosen = next(e for e in rows if e.seq_len == seq)
        around = around_pass(geo, chosen, generated_samples=gen, distill_steps=steps, distill_batch_size=dbatch)
        extra = [f"generating {gen} windows {_about(around.generation_seconds)} before the pass"] if gen else []
        if steps:
            extra.append(f"{steps} distillation steps {_about(around.distill_seconds)} after the surgery")
        if not extra:
            return Group(note, table)
        return Group(note, table, Text("Also: " + "; ".join(extra) + ".", style="dim"))


class PruningStep(Step):
    key = "pruning"
    title = "5 Pruning"

    def compose(self) -> ComposeResult:
        yield self.intro("How much to remove and the limits on it. Everything here can be changed later "
                         "in the What-if panel without recomputing importance.")
        for spec in PRUNING_FIELDS:
            yield self.row(spec)
        with Collapsible(title="Advanced: correction T/tau, normalization, early layers, compensation",
                         id="pruning-advanced"):
            for spec in PRUNING_ADVANCED:
                yield self.row(spec)
