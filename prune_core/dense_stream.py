"""The dense model's hidden states on the calibration batches, recorded while the importance pass runs.

Why: reconstruction with error feedback (compensation/reconstruct.py) needs, for every pruned layer,
the dense model's residual stream after that layer (and after its attention, where attention is
pruned) on the calibration windows. The importance pass has just run the dense model forward over
exactly those windows in exactly those batches, so recording each decoder layer's output there costs a
copy, where recomputing it costs one more forward of every layer (measured on smollm2-135m: a third
of the reconstruction's time; BENCHMARKS.md, "Importance pass").

THE CONTRACT:
- `StreamRecorder(tokens, batch_size, mids=...)` is attached to a model for one pass
  (`attach(stack, layers, attentions)`); the pass calls `begin_batch(b)` before batch b's forward. Each
  decoder layer's output (and, with `mids`, its input + its attention output) is copied to CPU memory
  into slot [b][layer]; a second forward of the same batch (gradient checkpointing's recomputation, a
  failed batch run again) overwrites the same slot with the same values.
- `result()` is the `DenseStream` once every batch that began has every layer recorded, else None.
- Only on a CPU model (on an accelerator the copies would stall the device or hold its memory; the
  reconstruction runs the dense layers itself there), and only within `budget_bytes()`
  (`fitting_mids`): without the mid-layer states when only the outputs fit, not at all when those
  would take more.
- A `DenseStream` belongs to the tokens and batch size it was recorded on; `matches` checks both, and
  the reconstruction uses it only then (and otherwise computes the dense stream as before).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# The most memory the recorded streams of one machine may take: an eighth of its memory, at most 2 GiB,
# shared by the ranks that run on it.
MAX_STREAM_BYTES = 2 << 30


def local_processes() -> int:
    """How many ranks share this machine's memory: torchrun's (and `accelerate launch`'s) LOCAL_WORLD_SIZE,
    SLURM's tasks per node, else 1."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0].split(",")[0]  # SLURM may say "4(x2)" or "4,2"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def budget_bytes() -> int:
    """How many bytes this process's recorded dense stream may take: its share (one of `local_processes()`)
    of an eighth of the machine's memory, at most 2 GiB in all."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return MAX_STREAM_BYTES // 4 // local_processes()
    return min(MAX_STREAM_BYTES, total // 8) // local_processes()


def stream_bytes(windows: int, seq_len: int, hidden: int, layers: int, itemsize: int, mids: bool) -> int:
    """Bytes of a recorded stream: every layer's output (and mid-layer state) of every window."""
    return windows * seq_len * hidden * layers * itemsize * (2 if mids else 1)


def fitting_mids(windows: int, seq_len: int, hidden: int, layers: int, itemsize: int, mids: bool) -> bool | None:
    """Whether to record the mid-layer states too (`mids`, when attention is pruned and they fit the
    budget), only the layer outputs (they alone fit: the reconstruction runs the layers whose attention
    it refits), or nothing (None: not even the outputs fit)."""
    for with_mids in (True, False) if mids else (False,):
        if stream_bytes(windows, seq_len, hidden, layers, itemsize, with_mids) <= budget_bytes():
            return with_mids
    return None


@dataclass
class DenseStream:
    """outputs[b][l]: decoder layer l's output on batch b [rows, seq_len, hidden] (CPU); mids[b][l]: the
    residual stream after layer l's attention, or None when not recorded."""

    tokens: torch.Tensor
    batch_size: int
    outputs: dict[int, list[torch.Tensor]]
    mids: dict[int, list[torch.Tensor]] | None

    def matches(self, tokens: torch.Tensor, batch_size: int, batches: Sequence[int]) -> bool:
        """Recorded on these tokens in batches of this size, with every batch in `batches` present."""
        return (batch_size == self.batch_size and tokens.shape == self.tokens.shape
                and bool(torch.equal(tokens.cpu(), self.tokens.cpu()))
                and all(b in self.outputs for b in batches))

    def output(self, layer: int, batches: Sequence[int], device: torch.device) -> list[torch.Tensor]:
        """Layer `layer`'s output on each batch of `batches`, on `device`."""
        return [self.outputs[b][layer].to(device) for b in batches]

    def mid(self, layer: int, batches: Sequence[int], device: torch.device) -> list[torch.Tensor] | None:
        """The stream after layer `layer`'s attention on each batch, or None when not recorded."""
        if self.mids is None:
            return None
        return [self.mids[b][layer].to(device) for b in batches]


class StreamRecorder:
    """Records a dense forward's per-layer outputs, batch by batch (module docstring)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, *, mids: bool) -> None:
        self.tokens = tokens
        self.batch_size = batch_size
        self.with_mids = mids
        self.outputs: dict[int, list[torch.Tensor | None]] = {}
        self.mids: dict[int, list[torch.Tensor | None]] = {}
        self.current: int | None = None
        self.num_layers = 0
        self._inputs: list[torch.Tensor | None] = []

    def attach(self, stack: ExitStack, layers: Sequence[nn.Module], attentions: Sequence[nn.Module]) -> None:
        """Hook every decoder layer (and its attention, for the mid-layer state) until `stack` closes."""
        self.num_layers = len(layers)
        self._inputs = [None] * len(layers)
        for i, layer in enumerate(layers):
            if self.with_mids:
                stack.callback(layer.register_forward_pre_hook(self._layer_input(i), with_kwargs=True).remove)
                stack.callback(attentions[i].register_forward_hook(self._attention_output(i)).remove)
            stack.callback(layer.register_forward_hook(self._layer_output(i)).remove)

    def begin_batch(self, b: int) -> None:
        self.current = b
        self.outputs[b] = [None] * self.num_layers
        if self.with_mids:
            self.mids[b] = [None] * self.num_layers

    def result(self) -> DenseStream | None:
        """The recorded stream (empty for a rank that ran no batch), or None when a batch that began misses
        a layer."""
        if any(t is None for row in self.outputs.values() for t in row):
            return None
        if self.with_mids and any(t is None for row in self.mids.values() for t in row):
            return None
        outputs = {b: [t for t in row if t is not None] for b, row in self.outputs.items()}
        mids = {b: [t for t in row if t is not None] for b, row in self.mids.items()} if self.with_mids else None
        return DenseStream(tokens=self.tokens, batch_size=self.batch_size, outputs=outputs, mids=mids)

    # hooks --------------------------------------------------------------------------------------
    def _layer_input(self, i: int) -> Any:
        def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._inputs[i] = args[0] if args else kwargs.get("hidden_states")
        return hook

    def _attention_output(self, i: int) -> Any:
        def hook(_mod: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            h = self._inputs[i]
            if self.current is None or h is None:
                return
            out = output[0] if isinstance(output, tuple) else output
            self.mids[self.current][i] = _copy(h.detach() + out.detach())
        return hook

    def _layer_output(self, i: int) -> Any:
        def hook(_mod: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            if self.current is None:
                return
            out = output[0] if isinstance(output, tuple) else output
            self.outputs[self.current][i] = _copy(out.detach())
            self._inputs[i] = None
        return hook


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.to("cpu", copy=True)

