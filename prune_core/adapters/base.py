"""What an architecture adapter must tell the engine: decoder layers, prunable modules, groups, costs.

A prunable *group* is the unit the global ranking removes. Which rows / columns of which tensors
form a group is *declared* by the adapter as a `LayerLayout` per layer (one `GroupLayout` for the
attention block, one for the MLP), and importance (groups.py, hooks.py), surgery and export all read
that declaration instead of re-deriving geometry from module names. A `Slice` says: along `axis` of
`module`'s weight (0 = output rows, 1 = input columns), group g owns the indices
[start + g·stride, start + g·stride + size). For axis 0 the module's bias (if any) belongs to the
group too; a module sliced only along axis 1 (an output projection) keeps its bias outside every group.

The default layout (Llama, Mistral, Qwen2, Qwen3, Gemma 2 / 3, SmolLM3):
- attention group k of layer l = KV head k: rows [k·d, (k+1)·d) of k_proj and v_proj (and their
  biases), rows [k·r·d, (k+1)·r·d) of q_proj (and bias) for its r = heads / kv_heads query heads,
  and the same columns of o_proj (d = head_dim);
- MLP channel j of layer l: row j of gate_proj and up_proj (and biases), column j of down_proj.
A fused-projection family declares its own layout (e.g. Phi-3: q, k and v are three row ranges of
one `qkv_proj`, gate and up two row ranges of `gate_up_proj`), and everything else follows.
Shapes are read off the modules, so an adapter works on an already pruned model whose layers
differ in size. Module leaf names must be unique within a layer (they key checkpoints and hooks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from prune_core.errors import BadInput

BLOCKS: tuple[str, str] = ("attention", "mlp")


@dataclass(frozen=True)
class Slice:
    """The indices one linear contributes to every group of a block (see the module docstring)."""

    module: str  # path relative to the decoder layer, e.g. "self_attn.q_proj"
    axis: int  # 0: output rows (weight and bias), 1: input columns (weight only)
    start: int  # first index of group 0
    size: int  # indices per group
    stride: int = 0  # distance between groups' first indices; 0 = size (contiguous groups)

    def __post_init__(self) -> None:
        if self.axis not in (0, 1) or self.size < 1 or self.start < 0 or self.stride < 0:
            raise ValueError(f"bad slice {self}")

    @property
    def step(self) -> int:
        return self.stride or self.size

    @property
    def name(self) -> str:
        """The module's leaf name (q_proj, qkv_proj, ...)."""
        return self.module.rsplit(".", 1)[-1]

    def indices(self, groups: Iterable[int]) -> list[int]:
        """The indices along `axis` owned by `groups`, in group order."""
        return [self.start + g * self.step + i for g in groups for i in range(self.size)]

    def group_sums(self, values: torch.Tensor, groups: int) -> torch.Tensor:
        """Σ of a vector indexed along `axis` over each group's indices → [groups] (values' dtype)."""
        if self.step == self.size:
            return values[self.start : self.start + groups * self.size].reshape(groups, self.size).sum(1)
        index = torch.arange(self.size, device=values.device) + self.start
        index = index + torch.arange(groups, device=values.device)[:, None] * self.step
        return values[index].sum(1)


@dataclass(frozen=True)
class GroupLayout:
    """The groups of one block of one layer: how many, and the slices each one owns."""

    block: str  # "attention" | "mlp"
    container: str  # the block module, relative to the layer ("self_attn", "mlp")
    groups: int
    slices: tuple[Slice, ...]
    output: str  # the output projection (its input columns are the block's features), e.g. "self_attn.o_proj"
    heads_per_group: int = 0  # attention: query heads per group (r); 0 for an MLP
    head_dim: int = 0

    def modules(self) -> tuple[str, ...]:
        """The sliced modules, in slice order, each once."""
        return tuple(dict.fromkeys(s.module for s in self.slices))

    def slices_of(self, module: str) -> tuple[Slice, ...]:
        return tuple(s for s in self.slices if s.module == module)

    def input_modules(self) -> tuple[str, ...]:
        """Modules sliced by rows: they read the block's input (q/k/v, gate/up, qkv_proj, ...)."""
        return tuple(m for m in self.modules() if any(s.axis == 0 for s in self.slices_of(m)))

    def output_slices(self) -> tuple[Slice, ...]:
        return tuple(s for s in self.slices if s.module == self.output and s.axis == 1)

    def output_columns(self, groups: Iterable[int]) -> list[int]:
        """Input columns of the output projection that `groups` own (sorted)."""
        groups = list(groups)
        return sorted(i for s in self.output_slices() for i in s.indices(groups))

    def kept_indices(self, slices: Iterable[Slice], size: int, removed: Iterable[int]) -> list[int]:
        """All `size` indices of an axis minus those the removed groups own in `slices`, in order."""
        removed = list(removed)
        gone = {i for s in slices for i in s.indices(removed)}
        return [i for i in range(size) if i not in gone]


@dataclass(frozen=True)
class LayerLayout:
    """A decoder layer's group layout: the attention block's and the MLP's."""

    attention: GroupLayout
    mlp: GroupLayout

    def block(self, name: str) -> GroupLayout:
        if name not in BLOCKS:
            raise ValueError(f"unknown block {name!r}")
        return self.attention if name == "attention" else self.mlp

    @property
    def blocks(self) -> tuple[GroupLayout, GroupLayout]:
        return (self.attention, self.mlp)


def removed_block(module: nn.Module) -> bool:
    """True for the stand-ins surgery puts where a block was pruned to 100 % (ZeroAttention / ZeroMLP)."""
    return bool(getattr(module, "removed_block", False))


def empty_layout(block: str, container: str) -> GroupLayout:
    """The layout of a block surgery removed entirely: no groups; its output is the stand-in itself."""
    return GroupLayout(block=block, container=container, groups=0, slices=(), output=container)


def standard_attention(container: str, *, kv_heads: int, heads_per_group: int, head_dim: int,
                       q: str = "q_proj", k: str = "k_proj", v: str = "v_proj", o: str = "o_proj") -> GroupLayout:
    """Separate q/k/v/o projections (Llama family): KV head k owns k/v rows [k·d, (k+1)·d), q rows and
    o_proj columns [k·r·d, (k+1)·r·d)."""
    d, rd = head_dim, heads_per_group * head_dim
    p = f"{container}."
    return GroupLayout(
        block="attention", container=container, groups=kv_heads,
        slices=(Slice(p + q, 0, 0, rd), Slice(p + k, 0, 0, d), Slice(p + v, 0, 0, d), Slice(p + o, 1, 0, rd)),
        output=p + o, heads_per_group=heads_per_group, head_dim=head_dim,
    )


def standard_mlp(container: str, *, channels: int, gate: str = "gate_proj", up: str = "up_proj",
                 down: str = "down_proj") -> GroupLayout:
    """Separate gate/up/down projections: channel j owns gate/up row j and down column j."""
    p = f"{container}."
    return GroupLayout(
        block="mlp", container=container, groups=channels,
        slices=(Slice(p + gate, 0, 0, 1), Slice(p + up, 0, 0, 1), Slice(p + down, 1, 0, 1)),
        output=p + down,
    )


def _path_in(layer: nn.Module, module: nn.Module) -> str:
    for name, m in layer.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the layer")


@dataclass(frozen=True)
class LayerParts:
    """The prunable modules of one decoder layer, its group layout and the geometry read off it.

    The named projections are those of the Llama family; a family that fuses them (or a block that
    surgery removed) leaves the missing ones None and describes everything through `layout`.
    Built without a layout (the Llama fields given), the standard layout is derived from the fields.
    """

    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    q_proj: nn.Linear | None
    k_proj: nn.Linear | None
    v_proj: nn.Linear | None
    o_proj: nn.Linear | None
    gate_proj: nn.Linear | None
    up_proj: nn.Linear | None
    down_proj: nn.Linear | None
    head_dim: int
    layout: LayerLayout = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(self, "layout", self._standard_layout())

    def _standard_layout(self) -> LayerLayout:
        q, k, o, gate = self.q_proj, self.k_proj, self.o_proj, self.gate_proj
        assert q is not None and k is not None and o is not None and gate is not None
        attn_path, mlp_path = _path_in(self.layer, self.attn), _path_in(self.layer, self.mlp)
        kv = k.out_features // self.head_dim
        r = q.out_features // k.out_features if k.out_features else 0
        return LayerLayout(
            attention=standard_attention(attn_path, kv_heads=kv, heads_per_group=r, head_dim=self.head_dim,
                                         q=_path_in(self.attn, q), k=_path_in(self.attn, k),
                                         v=_path_in(self.attn, self.v_proj), o=_path_in(self.attn, o)),
            mlp=standard_mlp(mlp_path, channels=gate.out_features, gate=_path_in(self.mlp, gate),
                             up=_path_in(self.mlp, self.up_proj), down=_path_in(self.mlp, self.down_proj)),
        )

    # modules -----------------------------------------------------------------------------------
    def module(self, path: str) -> nn.Module:
        """A submodule of the layer by its path relative to the layer ("self_attn.o_proj")."""
        return self.layer.get_submodule(path)

    def linear(self, path: str) -> nn.Linear:
        m = self.module(path)
        assert isinstance(m, nn.Linear), f"{path} is not a Linear"
        return m

    def linears(self, block: str) -> dict[str, nn.Linear]:
        """Leaf name → sliced linear of `block`, in layout order."""
        return {p.rsplit(".", 1)[-1]: self.linear(p) for p in self.layout.block(block).modules()}

    @property
    def attention_linears(self) -> dict[str, nn.Linear]:
        return self.linears("attention")

    @property
    def mlp_linears(self) -> dict[str, nn.Linear]:
        return self.linears("mlp")

    # geometry ----------------------------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.layout.attention.groups

    @property
    def num_heads(self) -> int:
        return self.layout.attention.groups * self.layout.attention.heads_per_group

    @property
    def group_size(self) -> int:
        """r: query heads per KV head."""
        return self.layout.attention.heads_per_group

    @property
    def hidden_size(self) -> int:
        for gl in self.layout.blocks:
            out = self.module(gl.output)
            if isinstance(out, nn.Linear):
                return out.out_features
        return int(getattr(self.module(self.layout.mlp.output), "hidden_size"))  # noqa: B009

    @property
    def intermediate_size(self) -> int:
        return self.layout.mlp.groups

    def groups(self, block: str) -> int:
        return self.layout.block(block).groups

    def group_cost(self, block: str) -> int:
        """Parameters of one group of `block`: its slices of every weight, plus row-sliced biases."""
        total = 0
        for s in self.layout.block(block).slices:
            lin = self.linear(s.module)
            other = lin.in_features if s.axis == 0 else lin.out_features
            total += s.size * other + (s.size if s.axis == 0 and lin.bias is not None else 0)
        return total

    def attention_group_cost(self) -> int:
        return self.group_cost("attention")

    def mlp_group_cost(self) -> int:
        return self.group_cost("mlp")

    def prunable_parameters(self) -> int:
        return sum(gl.groups * self.group_cost(gl.block) for gl in self.layout.blocks)


class Adapter:
    """Maps a causal LM of one family to its decoder layers, prunable parts and group layout.

    Subclasses set `model_types` (the `config.model_type` values they handle) and override the
    attribute paths if their family names modules differently; a family with another group layout
    (fused projections, interleaved heads) overrides `layout()` (and `resize()` if its modules
    cache sizes surgery must update). `attn_implementation` names the attention a family must run
    with when sdpa cannot compute it (Gemma 2's soft-capped attention logits need "eager").
    """

    model_types: tuple[str, ...] = ()
    layers_path: str = "model.layers"
    attn_name: str = "self_attn"
    mlp_name: str = "mlp"
    # the attention implementation the family needs; None: the loader's default (sdpa)
    attn_implementation: str | None = None
    # whether the attention / MLP outputs (o_proj, down_proj) are added to the residual stream as they
    # are; False for families that normalise them first (Gemma's post-attention / post-feed-forward
    # norms), where reconstruction's error feedback cannot map a stream error onto the projection
    residual_outputs: bool = True

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj: nn.Module = model
        for name in self.layers_path.split("."):
            obj = getattr(obj, name)
        assert isinstance(obj, nn.ModuleList)
        return obj

    def num_layers(self, model: nn.Module) -> int:
        return len(self.layers(model))

    def head_dim(self, model: nn.Module, attn: nn.Module) -> int:
        head_dim = getattr(attn, "head_dim", None)
        if head_dim is None:
            cfg = model.config  # type: ignore[attr-defined]
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return int(head_dim)

    def layout(self, model: nn.Module, layer_idx: int) -> LayerLayout:
        """The group layout of layer `layer_idx` as it is now (Llama family: separate projections)."""
        layer = self.layers(model)[layer_idx]
        attn, mlp = getattr(layer, self.attn_name), getattr(layer, self.mlp_name)
        if removed_block(attn):
            attention = empty_layout("attention", self.attn_name)
        else:
            d = self.head_dim(model, attn)
            kv, q = attn.k_proj.out_features, attn.q_proj.out_features
            attention = standard_attention(self.attn_name, kv_heads=kv // d, heads_per_group=q // kv if kv else 0,
                                           head_dim=d)
        channels = 0 if removed_block(mlp) else mlp.gate_proj.out_features
        mlp_layout = empty_layout("mlp", self.mlp_name) if removed_block(mlp) else standard_mlp(
            self.mlp_name, channels=channels)
        return LayerLayout(attention=attention, mlp=mlp_layout)

    def resize(self, model: nn.Module, layer_idx: int, block: str, groups: int) -> None:
        """After surgery left `groups` groups in `block` of layer `layer_idx`: update the sizes the
        block's module caches (head counts, intermediate size) so its forward stays valid."""
        layer = self.layers(model)[layer_idx]
        if block == "attention":
            attn = getattr(layer, self.attn_name)
            r = self.layout(model, layer_idx).attention.heads_per_group
            for name in ("num_heads", "num_attention_heads"):
                if isinstance(getattr(attn, name, None), int):
                    setattr(attn, name, groups * r)
            for name in ("num_key_value_heads", "num_kv_heads"):
                if isinstance(getattr(attn, name, None), int):
                    setattr(attn, name, groups)
        else:
            mlp = getattr(layer, self.mlp_name)
            if isinstance(getattr(mlp, "intermediate_size", None), int):
                mlp.intermediate_size = groups

    def parts(self, model: nn.Module, layer_idx: int) -> LayerParts:
        layer = self.layers(model)[layer_idx]
        attn = getattr(layer, self.attn_name)
        mlp = getattr(layer, self.mlp_name)
        return LayerParts(
            layer=layer,
            attn=attn,
            mlp=mlp,
            q_proj=getattr(attn, "q_proj", None),
            k_proj=getattr(attn, "k_proj", None),
            v_proj=getattr(attn, "v_proj", None),
            o_proj=getattr(attn, "o_proj", None),
            gate_proj=getattr(mlp, "gate_proj", None),
            up_proj=getattr(mlp, "up_proj", None),
            down_proj=getattr(mlp, "down_proj", None),
            head_dim=0 if removed_block(attn) else self.head_dim(model, attn),
            layout=self.layout(model, layer_idx),
        )

    def all_parts(self, model: nn.Module) -> list[LayerParts]:
        return [self.parts(model, i) for i in range(self.num_layers(model))]

    def attention_groups(self, model: nn.Module, layer_idx: int) -> int:
        return self.layout(model, layer_idx).attention.groups

    def mlp_groups(self, model: nn.Module, layer_idx: int) -> int:
        return self.layout(model, layer_idx).mlp.groups

    def attention_group_cost(self, model: nn.Module, layer_idx: int) -> int:
        return self.parts(model, layer_idx).attention_group_cost()

    def mlp_group_cost(self, model: nn.Module, layer_idx: int) -> int:
        return self.parts(model, layer_idx).mlp_group_cost()

    def prunable_parameters(self, model: nn.Module) -> int:
        return sum(p.prunable_parameters() for p in self.all_parts(model))

    def describe(self, model: nn.Module) -> dict[str, int | str]:
        """Facts the UI shows once a model is resolved."""
        first = self.parts(model, 0)
        return {
            "family": self.model_types[0] if self.model_types else "unknown",
            "layers": self.num_layers(model),
            "heads": first.num_heads,
            "kv_heads": first.num_kv_heads,
            "head_dim": first.head_dim,
            "hidden_size": first.hidden_size,
            "intermediate_size": first.intermediate_size,
            "prunable_parameters": self.prunable_parameters(model),
            "total_parameters": sum(p.numel() for p in model.parameters()),
        }


def check_head_norms(adapter: Adapter, model: nn.Module, layer_idx: int, names: tuple[str, ...]) -> None:
    """Refuse a layer whose q/k norms are not one `[head_dim]` weight shared by all heads."""
    attn = getattr(adapter.layers(model)[layer_idx], adapter.attn_name)
    if removed_block(attn):
        return
    d = adapter.head_dim(model, attn)
    for name in names:
        weight = getattr(getattr(attn, name, None), "weight", None)
        if weight is None or tuple(weight.shape) != (d,):
            shape = None if weight is None else tuple(weight.shape)
            raise BadInput(
                f"layer {layer_idx}: {adapter.attn_name}.{name} has weight shape {shape}, expected ({d},) "
                "(one RMSNorm over head_dim shared by all heads)",
                f"this is not a standard {adapter.model_types[0]} checkpoint; its attention needs its own adapter",
            )
