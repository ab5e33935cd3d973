"""Physical pruning: remove the selected attention groups and MLP channels so the model shrinks.

For every layer, the kept rows / columns of every linear the adapter's group layout slices
(`Adapter.layout`, prune_core/adapters/base.py) are copied into new, smaller `nn.Linear` modules
(weights and biases): a linear keeps all its indices along an axis except those the removed groups
own there. Default layout: attention group k = KV head k (rows of k/v, its r query heads' rows of q
and the same columns of o_proj), MLP channel j = row j of gate/up and column j of down_proj; a
fused qkv_proj / gate_up_proj loses the rows of every slice at once. The parameter count drops by
exactly Σ cost of the pruned groups (plus the output biases compensation adds, see below), and,
where a block is removed entirely, the parameters of it that belong to no group (Qwen3's and
Gemma 3's per-head q/k norm weights, `SurgeryReport.ungrouped_parameters`; none for Llama).

The Llama-family attention reshapes with -1 heads and repeats each KV head
`module.num_key_value_groups` = r times; since a kept KV head keeps all its r query heads, r is
unchanged and the forward stays valid. `Adapter.resize` then updates the sizes a block module
caches (head counts, intermediate size); `model.config` is left as the original (export relies on
that).

A block pruned to 100 % is replaced: attention by `ZeroAttention` (returns `(zeros, None)`, or the
constant output bias, and writes a 1-element-per-token placeholder into the KV cache so the cache's
sequence length stays right for generate()), the MLP by `ZeroMLP` (zeros or the constant bias).
The residual stream passes through; the layer still runs. Only the dynamic KV cache (the default)
is supported after pruning; a static cache preallocates from the config and does not fit.

Bias compensation (FLAP-style, `input_means` given): a removed o_proj / down_proj input column
j would have contributed W[:, j] · x_j; replacing x_j by its calibration mean, the expected
contribution W[:, removed] · mean[removed] is added to the projection's output bias (a bias is
created where there was none; this adds `hidden_size` parameters and is listed in
`SurgeryReport.compensated`). `input_means = {"o_proj": [L, in], "down_proj": [L, intermediate]}`
= ImportanceResult.input_sums / input_tokens, indexed by the columns of the model *before* surgery.

    from prune_core.surgery import apply_pruning
    report = apply_pruning(model, adapter, alloc.pruned_indices(), input_means=means)  # in place
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prune_core.adapters.base import GroupLayout, LayerParts
from prune_core.errors import BadInput

# input_means keys: the input of each block's output projection (ImportanceResult.input_sums)
INPUT_KEYS: dict[str, str] = {"attention": "o_proj", "mlp": "down_proj"}


class ZeroAttention(nn.Module):
    """Stands in for an attention block pruned to 100 %: outputs zeros (or a constant bias)."""

    removed_block = True  # adapters read this: the block has no groups left (adapters.base.removed_block)

    def __init__(self, hidden_size: int, layer_idx: int | None, bias: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        self.is_causal = True
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().to(dtype=dtype, device=device).clone())

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, past_key_values: Any = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        out = torch.zeros_like(hidden_states)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        if past_key_values is not None and self.layer_idx is not None and hasattr(past_key_values, "update"):
            # Keep the cache's per-layer sequence length (generate reads it, e.g. from layer 0).
            b, t = hidden_states.shape[0], hidden_states.shape[1]
            placeholder = hidden_states.new_zeros(b, 1, t, 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        return out, None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"


class ZeroMLP(nn.Module):
    """Stands in for an MLP pruned to 100 %: outputs zeros (or a constant bias)."""

    removed_block = True

    def __init__(self, hidden_size: int, bias: torch.Tensor | None = None, *,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().to(dtype=dtype, device=device).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, bias={self.bias is not None}"


@dataclass
class SurgeryReport:
    params_before: int
    params_after: int
    kept: dict[int, dict[str, list[int]]]  # layer -> {"attention": kept KV heads, "mlp": kept channels}
    removed_attention_blocks: list[int] = field(default_factory=list)
    removed_mlp_blocks: list[int] = field(default_factory=list)
    pruned_parameters: int = 0  # Σ cost of the removed groups
    compensated: list[str] = field(default_factory=list)  # module names whose output bias got compensation
    added_bias_parameters: int = 0  # parameters of biases compensation created
    # parameters of blocks removed entirely that belong to no group (Qwen3 / Gemma 3 per-head q/k norms)
    ungrouped_parameters: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before, "params_after": self.params_after,
            "kept": {str(k): v for k, v in self.kept.items()},
            "removed_attention_blocks": self.removed_attention_blocks,
            "removed_mlp_blocks": self.removed_mlp_blocks, "pruned_parameters": self.pruned_parameters,
            "compensated": self.compensated, "added_bias_parameters": self.added_bias_parameters,
            "ungrouped_parameters": self.ungrouped_parameters,
        }


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.contiguous(), requires_grad=like.requires_grad)


def _new_linear(old: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                bias: torch.Tensor | bool | None = True) -> nn.Linear:
    """A new Linear with old's rows/cols selected; bias=True keeps old's (sliced), a tensor / None replaces it."""
    w = old.weight.detach()
    sliced = rows is not None or cols is not None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    if bias is True:
        b = None if old.bias is None else old.bias.detach()
        if b is not None and rows is not None:
            b = b.index_select(0, rows.to(b.device))
    else:
        b = bias if isinstance(bias, torch.Tensor) else None
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    new.weight = _param(w if sliced else w.clone(), old.weight)
    if b is not None:
        new.bias = _param(b.to(dtype=w.dtype, device=w.device).clone(), old.weight)
    return new


def _compensation(linear: nn.Linear, removed_cols: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W[:, removed] · mean[removed], in the weight's dtype."""
    w = linear.weight.detach()
    cols = removed_cols.to(w.device)
    m = mean.detach().to(device=w.device, dtype=torch.float64).index_select(0, cols)
    return (w.index_select(1, cols).to(torch.float64) @ m).to(w.dtype)


def _output_bias(proj: nn.Linear, removed: torch.Tensor, input_means: dict[str, torch.Tensor] | None,
                 key: str, layer: int) -> tuple[torch.Tensor | None, int]:
    """The output bias a sliced projection keeps (compensated when input means are given) and the
    number of bias parameters that compensation adds where the projection had none."""
    if input_means is None:
        return (None if proj.bias is None else proj.bias.detach()), 0
    mean = _mean_row(input_means, key, layer, proj.in_features)
    added = proj.out_features if proj.bias is None else 0
    return _with_bias(proj.bias, _compensation(proj, removed, mean)), added


def _with_bias(base: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    return delta if base is None else base.detach().to(delta.dtype) + delta


def _indices(values: Sequence[int], n: int, what: str, layer: int) -> list[int]:
    out = sorted({int(v) for v in values})
    if out and (out[0] < 0 or out[-1] >= n):
        raise BadInput(f"layer {layer}: {what} index out of range 0..{n - 1}: {out[0] if out[0] < 0 else out[-1]}",
                       "prune indices computed for this model")
    return out


def _mean_row(input_means: Mapping[str, Any], key: str, layer: int, n: int) -> torch.Tensor:
    if key not in input_means:
        raise BadInput(f"input_means lacks {key!r}", "pass ImportanceResult.input_sums / input_tokens")
    row = torch.as_tensor(input_means[key][layer])
    if row.numel() != n:
        raise BadInput(f"input_means[{key!r}][{layer}] has {row.numel()} values, the layer {n} inputs",
                       "compute the means on this (unpruned) model")
    return row.reshape(-1)


def _replace(layer: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, leaf, module)


def _prune_block(model: nn.Module, adapter: Any, li: int, parts: LayerParts, gl: GroupLayout,
                 removed: list[int], keep: list[int], input_means: Mapping[str, Any] | None
                 ) -> tuple[str, int, bool]:
    """Slice every module of the block (or replace the block); returns (output name, added bias
    parameters, whether the block was replaced by a zero stand-in)."""
    out = parts.linear(gl.output)
    dev = out.weight.device
    removed_cols = torch.tensor(gl.output_columns(removed), dtype=torch.long, device=dev)
    bias, added = _output_bias(out, removed_cols, input_means, INPUT_KEYS[gl.block], li)
    if not keep:
        container = parts.module(gl.container)
        dtype = out.weight.dtype
        zero: nn.Module = (
            ZeroAttention(out.out_features, getattr(container, "layer_idx", li), bias, dtype=dtype, device=dev)
            if gl.block == "attention" else ZeroMLP(out.out_features, bias, dtype=dtype, device=dev)
        )
        _replace(parts.layer, gl.container, zero)
        return f"{adapter.layers_path}.{li}.{gl.container}", added, True
    for path in gl.modules():
        lin = parts.linear(path)
        slices = gl.slices_of(path)
        index: dict[int, torch.Tensor | None] = {0: None, 1: None}
        for axis, size in ((0, lin.out_features), (1, lin.in_features)):
            on_axis = [s for s in slices if s.axis == axis]
            if on_axis:
                index[axis] = torch.tensor(gl.kept_indices(on_axis, size, removed), dtype=torch.long,
                                           device=lin.weight.device)
        new = _new_linear(lin, rows=index[0], cols=index[1], bias=bias if path == gl.output else True)
        _replace(parts.layer, path, new)
    adapter.resize(model, li, gl.block, len(keep))
    return f"{adapter.layers_path}.{li}.{gl.output}", added, False


def _ungrouped_parameters(parts: LayerParts, gl: GroupLayout) -> int:
    """Parameters of a block that no group owns and its zero stand-in does not keep: they go with the
    block when it is removed entirely (Qwen3 / Gemma 3: the per-head q_norm / k_norm weights; 0 for
    Llama). The output bias is not among them: the stand-in keeps it."""
    out = parts.linear(gl.output)
    kept_bias = out.bias.numel() if out.bias is not None else 0
    return count_parameters(parts.module(gl.container)) - gl.groups * parts.group_cost(gl.block) - kept_bias


def apply_pruning(model: nn.Module, adapter: Any, pruned: Mapping[Any, Mapping[str, Sequence[int]]], *,
                  input_means: Mapping[str, Any] | None = None) -> SurgeryReport:
    """Remove `pruned[layer]["attention"]` KV groups and `pruned[layer]["mlp"]` channels in place."""
    num_layers = adapter.num_layers(model)
    requested = {int(k): v for k, v in pruned.items()}
    bad = [k for k in requested if not 0 <= k < num_layers]
    if bad:
        raise BadInput(f"pruned layers {bad} do not exist (the model has {num_layers})",
                       "prune indices computed for this model")
    for li, layer in enumerate(adapter.layers(model)):
        for block_name in (adapter.attn_name, adapter.mlp_name):
            if isinstance(getattr(layer, block_name), ZeroAttention | ZeroMLP):
                raise BadInput(f"layer {li} already had its {block_name} removed by an earlier pruning",
                               "prune the original model instead of an already pruned one")
    params_before = count_parameters(model)
    kept: dict[int, dict[str, list[int]]] = {}
    removed_blocks: dict[str, list[int]] = {"attention": [], "mlp": []}
    compensated: list[str] = []
    pruned_params = 0
    ungrouped = 0
    added = 0
    what = {"attention": "attention group", "mlp": "MLP channel"}

    with torch.no_grad():
        for li in range(num_layers):
            parts = adapter.parts(model, li)
            spec = requested.get(li, {})
            plan: list[tuple[GroupLayout, list[int], list[int]]] = []
            kept[li] = {}
            for gl in parts.layout.blocks:
                rm = _indices(spec.get(gl.block, ()), gl.groups, what[gl.block], li)
                gone = set(rm)
                keep = [g for g in range(gl.groups) if g not in gone]
                kept[li][gl.block] = keep
                pruned_params += len(rm) * parts.group_cost(gl.block)
                if rm and not keep:
                    ungrouped += _ungrouped_parameters(parts, gl)
                plan.append((gl, rm, keep))
            for gl, rm, keep in plan:
                if not rm:
                    continue
                name, extra, replaced = _prune_block(model, adapter, li, parts, gl, rm, keep, input_means)
                added += extra
                if replaced:
                    removed_blocks[gl.block].append(li)
                if input_means is not None:
                    compensated.append(name)

    return SurgeryReport(
        params_before=params_before,
        params_after=count_parameters(model),
        kept=kept,
        removed_attention_blocks=removed_blocks["attention"],
        removed_mlp_blocks=removed_blocks["mlp"],
        pruned_parameters=pruned_params,
        compensated=compensated,
        added_bias_parameters=added,
        ungrouped_parameters=ungrouped,
    )


def _output_modules(model: nn.Module, adapter: Any, li: int) -> dict[str, nn.Module]:
    """Per block, the module whose bias is the block's output bias: the output projection, or the
    zero stand-in of a removed block (the adapter's layout names either)."""
    layout = adapter.layout(model, li)
    layer = adapter.layers(model)[li]
    return {gl.block: layer.get_submodule(gl.output) for gl in layout.blocks}


def output_bias_flags(model: nn.Module, adapter: Any) -> dict[int, dict[str, bool]]:
    """Per layer: does the attention output (o_proj or ZeroAttention) / MLP output carry a bias?"""
    flags: dict[int, dict[str, bool]] = {}
    for li in range(adapter.num_layers(model)):
        flags[li] = {b: m.bias is not None for b, m in _output_modules(model, adapter, li).items()}
    return flags


def set_output_bias_flags(model: nn.Module, adapter: Any, flags: Mapping[Any, Mapping[str, bool]]) -> None:
    """Give (zero) or drop output biases so the modules match `flags` (used by export.load_pruned)."""
    for li, layer in enumerate(adapter.layers(model)):
        want = flags.get(li, flags.get(str(li)))  # type: ignore[call-overload]
        if want is None:
            continue
        for key, module in _output_modules(model, adapter, li).items():
            has = module.bias is not None
            if want.get(key, has) and not has:
                ref = next(module.parameters(), None)
                if ref is None:  # a Zero* module without parameters: take the layer's dtype / device
                    ref = next(layer.parameters())
                size = module.hidden_size if isinstance(module, ZeroAttention | ZeroMLP) else module.out_features
                module.bias = nn.Parameter(torch.zeros(size, dtype=ref.dtype, device=ref.device))
            elif not want.get(key, has) and has:
                module.register_parameter("bias", None)


def complement(kept: Mapping[Any, Mapping[str, Sequence[int]]], sizes: Mapping[int, tuple[int, int]]
               ) -> dict[int, dict[str, list[int]]]:
    """Pruned indices from kept ones: sizes = {layer: (kv_heads, intermediate)} of the unpruned model."""
    out: dict[int, dict[str, list[int]]] = {}
    for li, (n_att, n_mlp) in sizes.items():
        k = kept.get(li, kept.get(str(li)))  # type: ignore[call-overload]
        if k is None:
            continue
        ka, km = set(k.get("attention", range(n_att))), set(k.get("mlp", range(n_mlp)))
        out[li] = {"attention": [i for i in range(n_att) if i not in ka],
                   "mlp": [j for j in range(n_mlp) if j not in km]}
    return out
