"""Forward pre-hooks on the prunable linears: input sums (bias compensation) and wanda's input norms.

Every pass (taylor, taylor_2nd, wanda) accumulates, per layer, Σ_tokens x of the inputs of o_proj and
down_proj (`input_sums`; FLAP-style bias compensation later adds W[:, pruned] · mean(x)[pruned] to
the bias). wanda (`squares=True`) also accumulates Σ_tokens x_j² per input feature j of every
prunable linear — ‖X_j‖₂ = sqrt(Σ x_j²) — plus activation statistics per input tensor. Memory is
O(features): activations are reduced inside the hook and never stored.

All totals are plain float64 sums (all-reducible). Per-batch values go to `pending` first and are
added by `commit()` only after the engine has checked the batch, so a NaN batch never reaches the
totals. `active` is off outside the forward pass, so the forward that gradient checkpointing
recomputes during backward is not counted twice.

Which linears are hooked comes from the adapter's group layout: the output projection of each block
(o_proj, down_proj — `GroupLayout.output`) for the input sums, and every sliced linear for wanda.
The input sums are keyed by block role, "o_proj" (attention output) and "down_proj" (MLP output),
whatever the family calls the modules. The row-sliced linears of a block (q/k/v and gate/up, or a
fused qkv_proj / gate_up_proj) read the block's input: when several get the same tensor object the
hook reuses the batch result instead of reducing it again (its stat row stays empty so the shared
input counts once in the activation statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prune_core.adapters.base import LayerParts
from prune_core.importance.groups import pad_rows
from prune_core.importance.stats import ROW_WIDTH, fill_row

# ImportanceResult.input_sums keys: the input of each block's output projection
INPUT_SUM_KEYS: dict[str, str] = {"attention": "o_proj", "mlp": "down_proj"}
Key = tuple[int, str]  # (layer, module leaf name, or an INPUT_SUM_KEYS value for the sums)


def sum_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class InputHooks:
    """Accumulates input sums (o_proj, down_proj) and, with `squares`, Σx² per feature of all linears."""

    def __init__(self, parts: Sequence[LayerParts], *, squares: bool) -> None:
        self.parts = list(parts)
        self.squares = squares
        # (layer, leaf name) -> (path, block, sum key or None, shares the block input)
        self._modules: dict[Key, tuple[str, str, str | None, bool]] = {}
        for layer, p in enumerate(parts):
            for gl in p.layout.blocks:
                if not gl.groups:  # a block surgery removed entirely: nothing to observe
                    continue
                inputs = gl.input_modules()
                paths = gl.modules() if squares else (gl.output,)
                for path in paths:
                    name = path.rsplit(".", 1)[-1]
                    sum_key = INPUT_SUM_KEYS[gl.block] if path == gl.output else None
                    self._modules[(layer, name)] = (path, gl.block, sum_key, path in inputs)
        self.slots: list[Key] = list(self._modules)
        first = next((p.linear(gl.output) for p in parts for gl in p.layout.blocks if gl.groups), None)
        if first is None:
            raise ValueError("every attention and MLP block of this model was removed: nothing to score")
        self.device = first.weight.device
        self.dtype = sum_dtype(self.device)
        self.sums: dict[Key, torch.Tensor] = {}
        for (layer, _name), (path, _, sum_key, _) in self._modules.items():
            if sum_key is not None:
                self.sums[(layer, sum_key)] = self._zeros(layer, path)
        self.sq = {key: self._zeros(key[0], self._modules[key][0]) for key in self.slots} if squares else {}
        self.tokens = 0
        self.active = False
        self.counts = [0] * len(self.slots)
        row_dtype = torch.promote_types(first.weight.dtype, torch.float32)
        self.rows = torch.zeros(len(self.slots), ROW_WIDTH, dtype=row_dtype, device=self.device)
        self._scratch = torch.empty(0, dtype=row_dtype, device=self.device)
        self._pending_sum: dict[Key, torch.Tensor] = {}
        self._pending_sq: dict[Key, torch.Tensor] = {}
        self._last: dict[tuple[int, str], tuple[torch.Tensor, Key]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _linear(self, layer: int, path: str) -> torch.nn.Linear:
        return self.parts[layer].linear(path)

    def _zeros(self, layer: int, path: str) -> torch.Tensor:
        return torch.zeros(self._linear(layer, path).in_features, dtype=self.dtype, device=self.device)

    def owners(self) -> list[tuple[int, str]]:
        """(layer, block) of every stat row, for stats.BlockStats."""
        return [(i, self._modules[(i, n)][1]) for i, n in self.slots]

    # hooks -------------------------------------------------------------------------------------
    def __enter__(self) -> InputHooks:
        for slot, (layer, name) in enumerate(self.slots):
            linear = self._linear(layer, self._modules[(layer, name)][0])
            handle = linear.register_forward_pre_hook(self._make_hook(slot, layer, name))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._last.clear()

    def _make_hook(self, slot: int, layer: int, name: str) -> Callable[[torch.nn.Module, tuple], None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            if self.active:
                with torch.no_grad():
                    self._observe(slot, (layer, name), args[0])

        return hook

    def _observe(self, slot: int, key: Key, x: torch.Tensor) -> None:
        layer = key[0]
        _, block, sum_key, shares_input = self._modules[key]
        if self.squares and shares_input:
            last = self._last.get((layer, block))
            if last is not None and last[0] is x:
                self._pending_sq[key] = self._pending_sq[last[1]]
                return
            self._last[(layer, block)] = (x, key)
        compute = torch.promote_types(x.dtype, torch.float32)
        flat = x.reshape(-1, x.shape[-1])
        if flat.dtype != compute:
            flat = flat.to(compute)
        # per-batch sums in the compute dtype (a batch is at most a few thousand tokens), totals in float64
        if sum_key is not None:
            self._pending_sum[(layer, sum_key)] = flat.sum(0)
        if self.squares:
            self._pending_sq[key] = flat.square().sum(0)
            if self._scratch.numel() < flat.numel():
                self._scratch = torch.empty(flat.numel(), dtype=self.rows.dtype, device=self.device)
            fill_row(flat.reshape(-1).to(self.rows.dtype), self.rows[slot], self._scratch)
            self.counts[slot] = flat.numel()

    # one batch ---------------------------------------------------------------------------------
    def begin_batch(self) -> None:
        self._pending_sum.clear()
        self._pending_sq.clear()
        self._last.clear()
        self.rows.zero_()
        self.counts = [0] * len(self.slots)
        self.active = True

    def end_forward(self) -> None:
        self.active = False
        self._last.clear()

    def first_nonfinite(self) -> str | None:
        """Module key of the first pending sum holding NaN/Inf, or None (one device sync)."""
        items = list(self._pending_sum.items()) + list(self._pending_sq.items())
        if not items:
            return None
        totals = torch.stack([v.sum() for _, v in items]).tolist()
        for (key, _), total in zip(items, totals, strict=True):
            if total != total or total in (float("inf"), float("-inf")):
                return f"layers.{key[0]}.{key[1]} input"
        return None

    def commit(self, tokens: int) -> None:
        for key, value in self._pending_sum.items():
            self.sums[key].add_(value)
        for key, value in self._pending_sq.items():
            self.sq[key].add_(value)
        self.tokens += tokens
        self._pending_sum.clear()
        self._pending_sq.clear()

    # reading -----------------------------------------------------------------------------------
    def input_norm(self, layer: int, name: str) -> torch.Tensor:
        """‖X_j‖₂ = sqrt(Σ_tokens x_j²) of the input of `name` in `layer`."""
        return self.sq[(layer, name)].sqrt()

    def input_sums(self) -> dict[str, torch.Tensor]:
        """{"o_proj": [L, in], "down_proj": [L, intermediate]} float64 on CPU (NaN-padded if ragged)."""
        empty = torch.zeros(0, dtype=torch.float64)  # a removed block: no features
        return {n: pad_rows([self.sums.get((i, n), empty) for i in range(len(self.parts))])
                for n in INPUT_SUM_KEYS.values()}

    # checkpointing -----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"input_sum.{i}.{n}": t for (i, n), t in self.sums.items()}
        out.update({f"input_sq.{i}.{n}": t for (i, n), t in self.sq.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], tokens: int) -> None:
        with torch.no_grad():
            for name, dst in self.state_tensors().items():
                dst.copy_(tensors[name])
        self.tokens = tokens
