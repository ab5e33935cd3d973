"""Save a pruned model to a folder and load it back with the exact same shapes and weights.

A pruned model has per-layer shapes that its config cannot describe (layers keep different numbers
of KV heads and MLP channels, some blocks are replaced by zero modules, some projections gained a
compensation bias), so the folder stores the *original* config plus a `pruning.json` recipe:

    model.safetensors   the pruned state dict (safetensors.torch.save_model: tied / shared tensors
                        are stored once and restored on load)
    config.json         the original (unpruned) config
    generation_config.json, tokenizer files (when available)
    pruning.json        format / format_version, model_type, dtype, parameters, per-layer
                        {"layer", "attention": {"kept", "removed", "output_bias"}, "mlp": {...}},
                        removed_attention_blocks, removed_mlp_blocks, compensation_biases (module
                        names whose output bias the original architecture lacks), source, session

`load_pruned` instantiates the architecture from config.json (AutoModelForCausalLM.from_config, no
hub access, trust_remote_code off), replays the shape surgery of `prune_core.surgery` from the kept
indices (no importance needed), adds the recorded output biases, then loads the state dict strictly:
logits are bit-identical to the model that was saved. Group counts and output modules are read from
the adapter's group layout (`Adapter.layout`), so a family with fused projections exports the same way.

    from prune_core.export import load_pruned
    model, tokenizer = load_pruned("runs/my-session/model", device="cpu")   # dtype=None: as saved
    ids = tokenizer("Hello", return_tensors="pt").input_ids
    print(tokenizer.decode(model.generate(ids, max_new_tokens=20)[0]))

The folder is written atomically: everything goes into a hidden temporary folder next to the target
which is renamed into place only when complete (pruning.json is written last). An existing target is
replaced only if it is itself a pruned-model folder (has pruning.json) or empty. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from prune_core import atomic
from prune_core.adapters import get_adapter
from prune_core.errors import BadInput, RunFailed
from prune_core.surgery import (
    apply_pruning,
    complement,
    output_bias_flags,
    set_output_bias_flags,
)

FORMAT = "prune.pruned-model"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
RECIPE = "pruning.json"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _skeleton(config: Any, *, meta: bool, dtype: torch.dtype | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    with ctx:
        return AutoModelForCausalLM.from_config(config, **kwargs)


def _layer_sizes(model: nn.Module, adapter: Any) -> dict[int, tuple[int, int]]:
    return {i: (adapter.attention_groups(model, i), adapter.mlp_groups(model, i))
            for i in range(adapter.num_layers(model))}


def _norm_kept(kept: Mapping[Any, Mapping[str, Sequence[int]]]) -> dict[int, dict[str, list[int]]]:
    return {int(k): {"attention": [int(i) for i in v.get("attention", [])],
                     "mlp": [int(j) for j in v.get("mlp", [])]} for k, v in kept.items()}


def _check_target(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / RECIPE).exists())):
        raise BadInput(f"{folder} exists and is not a pruned-model folder",
                       "choose a new folder (an existing one is only replaced if it holds pruning.json)")


def _recipe(model: nn.Module, adapter: Any, kept: dict[int, dict[str, list[int]]], *, source: dict,
            session: dict) -> dict[str, Any]:
    config = model.config  # type: ignore[attr-defined]
    original = _skeleton(config, meta=True)
    sizes = _layer_sizes(original, adapter)
    original_flags = output_bias_flags(original, adapter)
    flags = output_bias_flags(model, adapter)
    layers: list[dict[str, Any]] = []
    removed_att: list[int] = []
    removed_mlp: list[int] = []
    compensation: list[str] = []
    for li in range(adapter.num_layers(model)):
        n_att, n_mlp = sizes[li]
        k = kept.get(li, {"attention": list(range(n_att)), "mlp": list(range(n_mlp))})
        layout = adapter.layout(model, li)  # a removed block (Zero stand-in) has 0 groups
        att_now, mlp_now = layout.attention.groups, layout.mlp.groups
        if len(k["attention"]) != att_now or len(k["mlp"]) != mlp_now:
            raise BadInput(f"layer {li}: kept lists ({len(k['attention'])} KV heads, {len(k['mlp'])} channels) do "
                           f"not match the model ({att_now}, {mlp_now})", "pass SurgeryReport.kept of this model")
        if any(not 0 <= i < n_att for i in k["attention"]) or any(not 0 <= j < n_mlp for j in k["mlp"]):
            raise BadInput(f"layer {li}: kept index out of range of the original model",
                           "pass SurgeryReport.kept of this model")
        if att_now == 0:
            removed_att.append(li)
        if mlp_now == 0:
            removed_mlp.append(li)
        prefix = f"{adapter.layers_path}.{li}"
        for gl in layout.blocks:  # the output projection, or the stand-in of a removed block
            if flags[li][gl.block] and not original_flags[li][gl.block]:
                compensation.append(f"{prefix}.{gl.output}")
        layers.append({
            "layer": li,
            "attention": {"kept": k["attention"], "removed": att_now == 0, "output_bias": flags[li]["attention"],
                          "original": n_att},
            "mlp": {"kept": k["mlp"], "removed": mlp_now == 0, "output_bias": flags[li]["mlp"], "original": n_mlp},
        })
    first = next(model.parameters())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": getattr(config, "model_type", None),
        "dtype": _dtype_name(first.dtype),
        "parameters": sum(p.numel() for p in model.parameters()),
        "num_layers": len(layers),
        "layers": layers,
        "removed_attention_blocks": removed_att,
        "removed_mlp_blocks": removed_mlp,
        "compensation_biases": compensation,
        "source": source,
        "session": session,
    }


def save_pruned(model: nn.Module, tokenizer: Any, folder: str | os.PathLike[str], *,
                kept: Mapping[Any, Mapping[str, Sequence[int]]], source: dict, session: dict) -> Path:
    """Write the pruned model folder (see the module docstring); returns its path."""
    folder = Path(folder)
    _check_target(folder)
    adapter = get_adapter(model)
    recipe = _recipe(model, adapter, _norm_kept(kept), source=source, session=session)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.to_json_file(str(tmp / "config.json"))  # type: ignore[attr-defined]
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with contextlib.suppress(ValueError):  # an invalid generation config is not worth failing for
                gen.to_json_file(str(tmp / "generation_config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        atomic.usual_permissions(tmp, recursive=True)  # mkdtemp makes 0700, safetensors 0600 files
        atomic.flush_tree(tmp)  # everything on disk before pruning.json marks the folder complete
        atomic.write_json(tmp / RECIPE, recipe)
        atomic.swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_recipe(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / RECIPE
    if not path.is_file():
        raise BadInput(f"{folder} has no {RECIPE}", "pass a folder written by save_pruned (prune run … save_model)")
    recipe = json.loads(path.read_text(encoding="utf-8"))
    if recipe.get("format") != FORMAT or int(recipe.get("format_version", 0)) > FORMAT_VERSION:
        raise BadInput(f"{path} is not a pruned-model recipe this version reads",
                       "re-export the model with this version of prune")
    return recipe


def load_pruned(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """Rebuild the pruned model (and its tokenizer, or None) from a save_pruned folder."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    folder = Path(folder)
    recipe = read_recipe(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise BadInput(f"{weights} is missing", "re-export the model")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    saved_dtype = _DTYPES.get(recipe.get("dtype", "float32"), torch.float32)
    # Build directly in the target dtype (like from_pretrained: rotary buffers stay float32);
    # load_state_dict casts the saved weights when `dtype` overrides the saved one.
    want = _resolve_dtype(dtype) or saved_dtype
    model = _skeleton(config, meta=False, dtype=want)
    adapter = get_adapter(model)
    sizes = _layer_sizes(model, adapter)
    kept = {int(e["layer"]): {"attention": e["attention"]["kept"], "mlp": e["mlp"]["kept"]}
            for e in recipe["layers"]}
    if len(kept) != len(sizes):
        raise BadInput(f"{RECIPE} describes {len(kept)} layers, config.json {len(sizes)}", "re-export the model")
    apply_pruning(model, adapter, complement(kept, sizes))
    set_output_bias_flags(model, adapter, {int(e["layer"]): {"attention": bool(e["attention"]["output_bias"]),
                                                             "mlp": bool(e["mlp"]["output_bias"])}
                                           for e in recipe["layers"]})
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as exc:
        raise RunFailed(f"{weights} does not match the rebuilt model: {exc}", "re-export the model") from exc
    model = model.to(device)
    model.eval()
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    return model, tokenizer

