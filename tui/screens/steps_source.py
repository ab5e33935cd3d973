"""Set-up steps 1 and 2: the model to prune and the calibration data.

Listing built-ins and reading a text preview run in thread workers that post a `Loaded` message back
to their step; resolving a model is a request to the app (`InspectRequested`). Typing never waits on
a download or a model load.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Button, Collapsible, Input, OptionList, Static
from textual.widgets.option_list import Option

import tui.engine as engine
from tui.estimate import human_count
from tui.messages import InspectRequested, Loaded, StateChanged
from tui.screens.steps_base import Step, value_at
from tui.widgets.fields import FieldRow, FieldSpec, row_id

MODEL_ADVANCED = (
    FieldSpec("model.dtype", "dtype", "choice", "weights and compute precision"),
    FieldSpec("model.device", "device", "text", "auto, cpu, cuda, cuda:N or mps"),
    FieldSpec("model.revision", "revision", "text", "hub branch, tag or commit (empty = default)"),
    FieldSpec("model.trust_remote_code", "trust remote code", "bool", "run code shipped with a hub model"),
)


def model_label(m: dict[str, Any]) -> Text:
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(f"{m.get('key', '?'):<16}", style="bold")
    params = m.get("parameters")
    text.append(f"{human_count(params) if isinstance(params, int | float) else '?':>7}  ")
    cached = bool(m.get("cached"))
    text.append("cached    " if cached else "download  ", style="green" if cached else "yellow")
    text.append(short(str(m.get("description", ""))), style="dim")
    return text


def short(description: str, limit: int = 40) -> str:
    """The first clause of a description, cut to fit one line at 80 columns (the full text shows below)."""
    first = description.split(";")[0].strip()
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def describe_model(info: engine.ModelInfo) -> str:
    return (f"{info.spec}: {info.family} · {info.layers} layers · {info.heads} heads / {info.kv_heads} KV heads"
            f" · hidden {info.hidden_size} · MLP {info.intermediate_size}\n"
            f"prunable {human_count(info.prunable_parameters)} of {human_count(info.total_parameters)} "
            f"parameters · on {info.device}")


class ModelStep(Step):
    key = "model"
    title = "1 Model"

    def compose(self) -> ComposeResult:
        yield self.intro("Pick a built-in model (Enter) or type a hub id, a local folder or a .gguf path.")
        yield OptionList(Option("loading the built-in models…", disabled=True), id="model-list")
        yield self.row(FieldSpec("model.id", "Model", "text", "Enter: inspect layers, heads, size"))
        with Vertical(id="model-info-box"):
            yield Static("Not inspected yet: press Enter in the Model field or i (Inspect).", id="model-info")
            yield Button("Inspect", id="inspect", compact=True)
        with Collapsible(title="Advanced: dtype, device, revision, remote code", id="model-advanced"):
            for spec in MODEL_ADVANCED:
                yield self.row(spec)

    def on_mount(self) -> None:
        self.load_builtins()
        self.show_info()

    @work(thread=True, group="builtins", exit_on_error=False)
    def load_builtins(self) -> None:
        try:
            models = engine.builtin_models()
        except Exception as exc:  # an engine problem must not take the UI down
            self.post_message(Loaded("models", [], str(exc)))
            return
        self.post_message(Loaded("models", models))

    def on_loaded(self, message: Loaded) -> None:
        message.stop()
        if message.what == "models":
            self._fill(message.value, message.error)

    def _fill(self, models: list[dict[str, Any]], error: str) -> None:
        self.state.builtin_models = models
        ol = self.query_one("#model-list", OptionList)
        ol.clear_options()
        if error:
            ol.add_option(Option(Text(f"cannot list built-in models: {error}", style="red"), disabled=True))
            return
        ol.add_options([Option(model_label(m), id=f"model-{m['key']}") for m in models])
        current = value_at(self.state.form_data, "model.id")
        keys = [m["key"] for m in models]
        if current in keys:
            ol.highlighted = keys.index(current)
        self.screen.post_message(StateChanged("estimate"))

    @on(OptionList.OptionSelected, "#model-list")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        key = (event.option.id or "").removeprefix("model-")
        self.query_one(f"#{row_id('model.id')}", FieldRow).set_value(key)
        self._revalidate()
        entry = next((m for m in self.state.builtin_models if m.get("key") == key), {})
        if entry.get("cached", True):
            self.post_message(InspectRequested())
        else:  # inspecting would download it: only on request
            self.query_one("#model-info", Static).update(
                f"{key} is not cached yet: Inspect (i) downloads and converts it in the background; "
                "a run does the same.")

    @on(OptionList.OptionHighlighted, "#model-list")
    def _highlighted(self, event: OptionList.OptionHighlighted) -> None:
        key = (event.option.id or "").removeprefix("model-")
        info = self.state.model_info
        if self.state.model_busy or (info is not None and info.spec == key):
            return
        entry = next((m for m in self.state.builtin_models if m.get("key") == key), None)
        if entry is not None:
            self.query_one("#model-info", Static).update(Text(
                f"{key}: {entry.get('description', '')}\nEnter picks it and shows its layers, heads and size."))

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "f-model--id":
            self.post_message(InspectRequested())

    @on(Button.Pressed, "#inspect")
    def _inspect(self) -> None:
        self.post_message(InspectRequested())

    def show_info(self) -> None:
        state = self.state
        box = self.query_one("#model-info", Static)
        if state.model_busy:
            box.update(Text(f"Inspecting {state.model_busy} … (loading runs in the background)"))
        elif state.model_error:
            box.update(Text(f"✗ {state.model_error}", style="red"))
        elif state.model_info is not None:
            box.update(Text(describe_model(state.model_info)))

    def on_form_changed(self) -> None:
        self.show_info()


class DatasetStep(Step):
    key = "dataset"
    title = "2 Dataset"

    def compose(self) -> ComposeResult:
        yield self.intro("Calibration text for the importance pass: a built-in (Enter) or a local file/folder.")
        yield OptionList(Option("loading datasets…", disabled=True), id="dataset-list")
        yield self.row(FieldSpec("data.dataset", "Dataset", "text", "Enter: preview and count tokens"))
        yield Static("", id="dataset-stats")
        yield Static("", id="dataset-preview")

    def on_mount(self) -> None:
        self._previewed: str | None = None
        self.load_names()

    @work(thread=True, group="datasets", exit_on_error=False)
    def load_names(self) -> None:
        try:
            names = engine.dataset_names()
        except Exception as exc:
            self.post_message(Loaded("datasets", [], str(exc)))
            return
        self.post_message(Loaded("datasets", names))

    def on_loaded(self, message: Loaded) -> None:
        message.stop()
        if message.what == "datasets":
            self._fill(message.value, message.error)
        elif message.what == "preview":
            self._show(*message.value, message.error)

    def _fill(self, names: list[dict[str, Any]], error: str) -> None:
        ol = self.query_one("#dataset-list", OptionList)
        ol.clear_options()
        if error:
            ol.add_option(Option(Text(f"cannot list datasets: {error}", style="red"), disabled=True))
            return
        for d in names:
            ready = bool(d.get("cached", d.get("available", False)))
            label = Text(no_wrap=True, overflow="ellipsis")
            label.append(f"{d.get('key', '?'):<14}", style="bold")
            label.append("ready     " if ready else "download  ", style="green" if ready else "yellow")
            label.append(short(str(d.get("description", "")), 44), style="dim")
            ol.add_option(Option(label, id=f"dataset-{d['key']}"))
        current = value_at(self.state.form_data, "data.dataset")
        keys = [d["key"] for d in names]
        if current in keys:
            ol.highlighted = keys.index(current)

    @on(OptionList.OptionSelected, "#dataset-list")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        key = (event.option.id or "").removeprefix("dataset-")
        if key == "<path>":  # a local file: type it in the field
            self.query_one("#dataset-stats", Static).update("Type the path of a .txt/.jsonl/.parquet file or a "
                                                            "folder, then Enter.")
            self.query_one("#f-data--dataset", Input).focus()
            return
        self.query_one(f"#{row_id('data.dataset')}", FieldRow).set_value(key)
        self._revalidate()
        self.preview()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "f-data--dataset":
            self.preview()

    def on_activated(self) -> None:
        dataset = value_at(self.state.form_data, "data.dataset")
        if dataset and dataset != self._previewed:
            self.preview()

    def preview(self) -> None:
        dataset = str(value_at(self.state.form_data, "data.dataset") or "")
        if not dataset:
            return
        self._previewed = dataset
        self.query_one("#dataset-stats", Static).update(Text(f"Reading {dataset} …"))
        info = self.state.model_info
        self._load_preview(dataset, info.tokenizer if info is not None else None)

    @work(thread=True, exclusive=True, group="preview", exit_on_error=False)
    def _load_preview(self, dataset: str, tokenizer: Any) -> None:
        try:
            text, chars = engine.preview_text(dataset)
            tokens: tuple[int, bool] | None = None
            if tokenizer is not None:
                tokens = engine.count_tokens(tokenizer, dataset)
        except Exception as exc:
            self.post_message(Loaded("preview", (dataset, "", 0, None), str(exc)))
            return
        self.post_message(Loaded("preview", (dataset, text, chars, tokens)))

    def _show(self, dataset: str, text: str, chars: int, tokens: tuple[int, bool] | None, error: str) -> None:
        stats = self.query_one("#dataset-stats", Static)
        if error:
            stats.update(Text(f"✗ {dataset}: {error}", style="red"))
            self.query_one("#dataset-preview", Static).update("")
            return
        if tokens is None:
            count = f"≈{human_count(chars / 4)} tokens (inspect the model in step 1 for an exact count)"
        else:
            count = f"{'≈' if tokens[1] else ''}{human_count(tokens[0])} tokens"
        stats.update(Text(f"{dataset}: {human_count(chars)} characters · {count}"))
        lines = [line for line in text.strip().splitlines() if line.strip()][:8]
        self.query_one("#dataset-preview", Static).update(Text("\n".join(lines), style="italic"))
