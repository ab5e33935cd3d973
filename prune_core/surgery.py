"""Physical pruning: remove the selected attention groups and MLP channels so the model shrinks.

For every layer, the kept rows / columns of q/k/v/o and gate/up/down are copied into new, smaller
`nn.Linear` modules (weights and biases), following the group definitions of
`prune_core.adapters.base`: attention group k = KV head k (rows of k/v, its r query heads' rows of q
and the same columns of o_proj), MLP channel j = row j of gate/up and column j of down_proj. The
parameter count drops by exactly Σ cost of the pruned groups (plus the output biases compensation
adds, see below).

The Llama-family attention reshapes with -1 heads and repeats each KV head
`module.num_key_value_groups` = r times; since a kept KV head keeps all its r query heads, r is
unchanged and the forward stays valid. Per-module head counts (`num_heads`, `num_key_value_heads`,
when a transformers version has them) are updated; `model.config` is left as the original (export
relies on that).

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

from prune_core.errors import BadInput


class ZeroAttention(nn.Module):
    """Stands in for an attention block pruned to 100 %: outputs zeros (or a constant bias)."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "params_before": self.params_before, "params_after": self.params_after,
            "kept": {str(k): v for k, v in self.kept.items()},
            "removed_attention_blocks": self.removed_attention_blocks,
            "removed_mlp_blocks": self.removed_mlp_blocks, "pruned_parameters": self.pruned_parameters,
            "compensated": self.compensated, "added_bias_parameters": self.added_bias_parameters,
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


def _set_head_counts(attn: nn.Module, heads: int, kv_heads: int) -> None:
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, heads)
    for name in ("num_key_value_heads", "num_kv_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, kv_heads)


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
    removed_att: list[int] = []
    removed_mlp: list[int] = []
    compensated: list[str] = []
    pruned_params = 0
    added = 0

    with torch.no_grad():
        for li in range(num_layers):
            parts = adapter.parts(model, li)
            spec = requested.get(li, {})
            att_rm = _indices(spec.get("attention", ()), parts.num_kv_heads, "attention group", li)
            mlp_rm = _indices(spec.get("mlp", ()), parts.intermediate_size, "MLP channel", li)
            att_set, mlp_set = set(att_rm), set(mlp_rm)
            att_keep = [k for k in range(parts.num_kv_heads) if k not in att_set]
            mlp_keep = [j for j in range(parts.intermediate_size) if j not in mlp_set]
            kept[li] = {"attention": att_keep, "mlp": mlp_keep}
            pruned_params += len(att_rm) * parts.attention_group_cost() + len(mlp_rm) * parts.mlp_group_cost()

            if att_rm:
                d, r = parts.head_dim, parts.group_size
                o = parts.o_proj
                dev = o.weight.device
                kv_rows = torch.tensor([k * d + i for k in att_keep for i in range(d)], dtype=torch.long, device=dev)
                q_rows = torch.tensor([k * r * d + i for k in att_keep for i in range(r * d)],
                                      dtype=torch.long, device=dev)
                q_removed = torch.tensor([k * r * d + i for k in att_rm for i in range(r * d)],
                                         dtype=torch.long, device=dev)
                bias, extra = _output_bias(o, q_removed, input_means, "o_proj", li)
                added += extra
                if att_keep:
                    attn = parts.attn
                    attn.q_proj = _new_linear(parts.q_proj, rows=q_rows)
                    attn.k_proj = _new_linear(parts.k_proj, rows=kv_rows)
                    attn.v_proj = _new_linear(parts.v_proj, rows=kv_rows)
                    attn.o_proj = _new_linear(o, cols=q_rows, bias=bias)
                    _set_head_counts(attn, len(att_keep) * r, len(att_keep))
                    name = f"{adapter.layers_path}.{li}.{adapter.attn_name}.o_proj"
                else:
                    zero = ZeroAttention(o.out_features, getattr(parts.attn, "layer_idx", li), bias,
                                         dtype=o.weight.dtype, device=dev)
                    setattr(parts.layer, adapter.attn_name, zero)
                    removed_att.append(li)
                    name = f"{adapter.layers_path}.{li}.{adapter.attn_name}"
                if input_means is not None:
                    compensated.append(name)

            if mlp_rm:
                down = parts.down_proj
                dev = down.weight.device
                keep_t = torch.tensor(mlp_keep, dtype=torch.long, device=dev)
                rm_t = torch.tensor(mlp_rm, dtype=torch.long, device=dev)
                bias, extra = _output_bias(down, rm_t, input_means, "down_proj", li)
                added += extra
                if mlp_keep:
                    mlp = parts.mlp
                    mlp.gate_proj = _new_linear(parts.gate_proj, rows=keep_t)
                    mlp.up_proj = _new_linear(parts.up_proj, rows=keep_t)
                    mlp.down_proj = _new_linear(down, cols=keep_t, bias=bias)
                    if isinstance(getattr(mlp, "intermediate_size", None), int):
                        mlp.intermediate_size = len(mlp_keep)
                    name = f"{adapter.layers_path}.{li}.{adapter.mlp_name}.down_proj"
                else:
                    zero_mlp = ZeroMLP(down.out_features, bias, dtype=down.weight.dtype, device=dev)
                    setattr(parts.layer, adapter.mlp_name, zero_mlp)
                    removed_mlp.append(li)
                    name = f"{adapter.layers_path}.{li}.{adapter.mlp_name}"
                if input_means is not None:
                    compensated.append(name)

    return SurgeryReport(
        params_before=params_before,
        params_after=count_parameters(model),
        kept=kept,
        removed_attention_blocks=removed_att,
        removed_mlp_blocks=removed_mlp,
        pruned_parameters=pruned_params,
        compensated=compensated,
        added_bias_parameters=added,
    )


def output_bias_flags(model: nn.Module, adapter: Any) -> dict[int, dict[str, bool]]:
    """Per layer: does the attention output (o_proj or ZeroAttention) / MLP output carry a bias?"""
    flags: dict[int, dict[str, bool]] = {}
    for li, layer in enumerate(adapter.layers(model)):
        attn = getattr(layer, adapter.attn_name)
        mlp = getattr(layer, adapter.mlp_name)
        a = attn if isinstance(attn, ZeroAttention) else attn.o_proj
        m = mlp if isinstance(mlp, ZeroMLP) else mlp.down_proj
        flags[li] = {"attention": a.bias is not None, "mlp": m.bias is not None}
    return flags


def set_output_bias_flags(model: nn.Module, adapter: Any, flags: Mapping[Any, Mapping[str, bool]]) -> None:
    """Give (zero) or drop output biases so the modules match `flags` (used by export.load_pruned)."""
    for li, layer in enumerate(adapter.layers(model)):
        want = flags.get(li, flags.get(str(li)))  # type: ignore[call-overload]
        if want is None:
            continue
        attn = getattr(layer, adapter.attn_name)
        mlp = getattr(layer, adapter.mlp_name)
        targets = {
            "attention": attn if isinstance(attn, ZeroAttention) else attn.o_proj,
            "mlp": mlp if isinstance(mlp, ZeroMLP) else mlp.down_proj,
        }
        for key, module in targets.items():
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
