"""What `prune plan` reads off a model without its weights: the config, and the model built on the meta device.

`load_config(spec)` finds the transformers config a model spec names (built-in tiny models, the cached
smollm2-135m, a local folder, a hub id; never remote code, never a weight file) and
`geometry_from_config(config)` instantiates the model on the meta device to count its parameters by
kind (embeddings, attention, MLP, norms, head) and the ones the gradient methods score. The memory
formulas in memplan.py take only this `Geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prune_core.errors import BadInput

__all__ = ["Geometry", "geometry_from_config", "load_config"]


@dataclass(frozen=True)
class Geometry:
    """What the plan reads off a model: config numbers and parameter counts (meta device)."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    parameters: dict[str, int]  # embeddings, attention, mlp, norms, lm_head, other, total
    scored: int  # parameters the gradient methods score (P_s)
    largest_scored: int  # elements of the largest scored tensor
    attention_bias: bool = False

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim


def _bucket(name: str) -> str:
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "lm_head"
    module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name  # "input_layernorm", "q_norm", "norm"
    if "norm" in module:
        return "norms"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "other"


def geometry_from_config(config: Any) -> Geometry:
    """Build the model on the meta device (no weights, no memory) and count what the plan needs."""
    from transformers import AutoModelForCausalLM

    from prune_core.adapters import adapter_for_type
    from prune_core.importance.groups import prunable_targets

    model_type = str(getattr(config, "model_type", ""))
    from prune_core.models import _check_family

    _check_family(model_type, f"the config ({model_type or 'no model_type'})")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[-400:]
        raise BadInput(f"cannot build a {model_type!r} model from this config ({reason or type(exc).__name__})",
                       "check the config.json numbers (hidden_size, num_attention_heads, …)") from None
    counts = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head", "other"), 0)
    for name, p in model.named_parameters():  # unique parameters: a tied lm_head is not listed again
        counts[_bucket(name)] += p.numel()
    counts["total"] = sum(counts.values())
    parts = adapter_for_type(model_type).all_parts(model)
    targets = prunable_targets(parts)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return Geometry(
        model_type=model_type,
        hidden=hidden,
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        intermediate=int(text.intermediate_size),
        vocab=int(text.vocab_size),
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        parameters=counts,
        scored=sum(t.param.numel() for t in targets),
        largest_scored=max(t.param.numel() for t in targets),
        attention_bias=bool(getattr(text, "attention_bias", False)),
    )


def load_config(spec: str, *, revision: str = "") -> tuple[Any, str]:
    """The transformers config a model spec names, without weights; returns (config, where it came from).

    Built-in tiny models: their config in code; smollm2-135m: the cached folder's config.json (not
    fetched: a plan reads no weights); a local folder's config.json; a hub id's config.json (the only
    file read). trust_remote_code is never turned on.
    """
    from transformers import AutoConfig

    from prune_core import tiny, zoo
    from prune_core.models import _classify, _hub_error

    spec = (spec or "").strip()
    if not spec:
        raise BadInput("no model given", "set [model] id in the session or pass --model")
    if spec in tiny.TINY_MODELS:
        return tiny.make_config(spec), f"builtin:{spec}"
    if spec in zoo.ZOO:
        if not zoo.is_cached(spec):
            raise BadInput(f"{spec} is not downloaded yet, so its config cannot be read without fetching the "
                           "weights",
                           "run `prune run` once on it (it is fetched and cached), or pass --model with a "
                           "local folder or hub id")
        folder = zoo.model_dir(spec)  # cached (checked above): nothing is fetched
        return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False), str(folder)
    path = Path(spec).expanduser()
    if (path / "pruning.json").is_file():
        raise BadInput(f"{spec} is a pruned model folder: its layers have their own widths, which a plain config "
                       "does not describe",
                       "plan the original model (its hub id or folder); a pruned model needs less than that")
    source = _classify(spec, revision)
    kwargs: dict[str, Any] = {"trust_remote_code": False, "local_files_only": source.local_only}
    if source.revision:
        kwargs["revision"] = source.revision
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return AutoConfig.from_pretrained(source.path, **kwargs), source.label
    except Exception as exc:
        mapped = _hub_error(exc, spec, revision, source.local_only) if source.is_hub else None
        if mapped is not None:
            raise mapped from None
        first = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[-400:] or type(exc).__name__
        raise BadInput(f"cannot read the config of {spec} ({first})",
                       "point --model at a Hugging Face model folder with a valid config.json") from None
