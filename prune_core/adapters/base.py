"""What an architecture adapter must tell the engine: decoder layers, prunable modules, groups, costs.

A prunable *group* is the unit the global ranking removes:
- attention group k of layer l = KV head k: rows [k·d, (k+1)·d) of k_proj and v_proj (and their
  biases), rows [k·r·d, (k+1)·r·d) of q_proj (and bias) for its r = heads / kv_heads query heads,
  and the same columns of o_proj (d = head_dim);
- MLP channel j of layer l: row j of gate_proj and up_proj (and biases), column j of down_proj.
The o_proj / down_proj biases belong to no group (they stay). Shapes are read off the modules, so an
adapter works on an already pruned model whose layers differ in size.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def _bias_numel(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else 1


@dataclass(frozen=True)
class LayerParts:
    """The prunable modules of one decoder layer and the attention geometry read off them."""

    layer: nn.Module
    attn: nn.Module
    mlp: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    head_dim: int

    @property
    def num_kv_heads(self) -> int:
        return self.k_proj.out_features // self.head_dim

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    @property
    def group_size(self) -> int:
        """r: query heads per KV head."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def hidden_size(self) -> int:
        return self.q_proj.in_features

    @property
    def intermediate_size(self) -> int:
        return self.gate_proj.out_features

    @property
    def attention_linears(self) -> dict[str, nn.Linear]:
        return {"q_proj": self.q_proj, "k_proj": self.k_proj, "v_proj": self.v_proj, "o_proj": self.o_proj}

    @property
    def mlp_linears(self) -> dict[str, nn.Linear]:
        return {"gate_proj": self.gate_proj, "up_proj": self.up_proj, "down_proj": self.down_proj}

    def attention_group_cost(self) -> int:
        d, r, h = self.head_dim, self.group_size, self.hidden_size
        weights = 2 * d * h + 2 * r * d * h  # k, v rows + q rows + o columns
        biases = d * (_bias_numel(self.k_proj) + _bias_numel(self.v_proj)) + r * d * _bias_numel(self.q_proj)
        return weights + biases

    def mlp_group_cost(self) -> int:
        h = self.hidden_size
        return 3 * h + _bias_numel(self.gate_proj) + _bias_numel(self.up_proj)

    def prunable_parameters(self) -> int:
        return self.num_kv_heads * self.attention_group_cost() + self.intermediate_size * self.mlp_group_cost()


class Adapter:
    """Maps a causal LM of one family to its decoder layers and prunable parts.

    Subclasses set `model_types` (the `config.model_type` values they handle) and override the
    attribute paths if their family names modules differently.
    """

    model_types: tuple[str, ...] = ()
    layers_path: str = "model.layers"
    attn_name: str = "self_attn"
    mlp_name: str = "mlp"

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

    def parts(self, model: nn.Module, layer_idx: int) -> LayerParts:
        layer = self.layers(model)[layer_idx]
        attn = getattr(layer, self.attn_name)
        mlp = getattr(layer, self.mlp_name)
        return LayerParts(
            layer=layer,
            attn=attn,
            mlp=mlp,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            o_proj=attn.o_proj,
            gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj,
            down_proj=mlp.down_proj,
            head_dim=self.head_dim(model, attn),
        )

    def all_parts(self, model: nn.Module) -> list[LayerParts]:
        return [self.parts(model, i) for i in range(self.num_layers(model))]

    def attention_groups(self, model: nn.Module, layer_idx: int) -> int:
        return self.parts(model, layer_idx).num_kv_heads

    def mlp_groups(self, model: nn.Module, layer_idx: int) -> int:
        return self.parts(model, layer_idx).intermediate_size

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
