"""Export a pruned model as a plain Hugging Face folder (`prune export --format hf`).

Our pruned-model folder (`prune_core.export`) keeps the original config plus a recipe, because a
pruned model usually has per-layer shapes no config describes. When the pruning happens to be
*uniform* — every layer keeps the same number of KV heads and the same number of MLP channels, no
attention or MLP block is removed — the model is an ordinary model of its architecture with smaller
sizes, and this module writes it as one: `config.json` with the pruned sizes (num_key_value_heads,
num_attention_heads, an explicit head_dim, intermediate_size), `model.safetensors` (sharded by
transformers when large), the tokenizer files and `generation_config.json`. It then loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` without this package, and without
trust_remote_code.

Compensation biases (output biases the pruning added) are kept when the architecture's config can
express them: a Llama config's `attention_bias` / `mlp_bias` switch on the biases of every projection
of the block, so the ones the pruning did not add are written as zeros (exact: adding 0 changes no
logit). An architecture without such a switch (Mistral, Qwen2's o_proj) is refused.

Nothing is trusted by construction: the pruned sizes go into a config, the plain model built from it
(on the meta device, no memory) must have exactly our parameter names and shapes, and after writing,
the folder is loaded back with `from_pretrained` and its logits compared with ours on a few tokens
(`verify=True`, the default; it holds a second copy of the model in memory) before the folder is
renamed into place. Non-uniform models are refused with the layers that differ and what to use instead
(`load_pruned`); see the README for the state of per-layer configs in transformers and vLLM.

The folder is written atomically (a hidden temporary folder next to the target, renamed when
complete); an existing target is replaced only if it is empty or an earlier export (it holds
`prune_export.json`). safetensors only: nothing is pickled.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_core import atomic
from prune_core.errors import BadInput, RunFailed

MARKER = "prune_export.json"
MARKER_FORMAT = "prune.hf-export"
LOAD_PRUNED = ("load it with prune_core.export.load_pruned(FOLDER) (README: 'Using a pruned model from Python'), "
               "which rebuilds per-layer shapes")
LOAD_PRUNED_FIX = (f"{LOAD_PRUNED}; for a plain Hugging Face folder, prune with the same number of KV heads and "
                   "MLP channels in every layer and no removed blocks")
COMPENSATION_FIX = (f"{LOAD_PRUNED}; for a plain Hugging Face folder of this architecture, run the session with "
                    "[pruning] compensate = \"none\" (reconstruct and bias add output biases it cannot hold)")

Say = Callable[[str], None]


@dataclass
class HFExport:
    """What `export_hf` wrote."""

    folder: Path
    source: Path
    architecture: str
    sizes: dict[str, Any]
    parameters: int
    zero_biases: list[str] = field(default_factory=list)  # bias tensors written as zeros
    max_abs_logit_diff: float | None = None  # from the verification, None when skipped

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "source": str(self.source), "format": "hf",
                "architecture": self.architecture, "sizes": self.sizes, "parameters": self.parameters,
                "zero_biases": len(self.zero_biases), "verified": self.max_abs_logit_diff is not None,
                "max_abs_logit_diff": self.max_abs_logit_diff}


def model_folder(path: Path) -> Path:
    """The pruned-model folder of `path`: itself (it holds pruning.json) or a results folder's model/."""
    from prune_core.export import RECIPE
    from prune_core.report import is_results_folder, verify_manifest

    path = Path(path)
    if (path / RECIPE).is_file():
        return path
    if is_results_folder(path):
        if not (path / "model" / RECIPE).is_file():
            raise BadInput(f"the results folder {path} holds no saved model",
                           "run the session again with [output] save_model = true")
        verify_manifest(path)  # the weights are the ones the run wrote
        return path / "model"
    raise BadInput(f"{path} is neither a results folder nor a saved pruned model (no pruning.json)",
                   "pass a results folder (runs/NAME) or its model/ folder")


def _ranges(layers: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → "0-2, 5, 7-8"."""
    out: list[str] = []
    items = sorted(layers)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ", ".join(out)


def _spread(counts: dict[int, int], what: str) -> str | None:
    by_value: dict[int, list[int]] = {}
    for layer, n in counts.items():
        by_value.setdefault(n, []).append(layer)
    if len(by_value) <= 1:
        return None
    parts = [f"{n} in layer{'s' if len(ls) > 1 else ''} {_ranges(ls)}"
             for n, ls in sorted(by_value.items(), key=lambda kv: (-len(kv[1]), -kv[0]))]
    return f"{what} differ: " + "; ".join(parts)


def uniformity_problems(recipe: dict[str, Any]) -> list[str]:
    """Why the recipe's model has no plain config (empty when every layer has the same widths)."""
    problems: list[str] = []
    layers = recipe.get("layers") or []
    removed_att = [int(e["layer"]) for e in layers if e["attention"].get("removed")]
    removed_mlp = [int(e["layer"]) for e in layers if e["mlp"].get("removed")]
    if removed_att:
        problems.append(f"the attention block is removed in layer{'s' if len(removed_att) > 1 else ''} "
                        f"{_ranges(removed_att)}")
    if removed_mlp:
        problems.append(f"the MLP block is removed in layer{'s' if len(removed_mlp) > 1 else ''} "
                        f"{_ranges(removed_mlp)}")
    kv = {int(e["layer"]): len(e["attention"]["kept"]) for e in layers if not e["attention"].get("removed")}
    mlp = {int(e["layer"]): len(e["mlp"]["kept"]) for e in layers if not e["mlp"].get("removed")}
    for text in (_spread(kv, "KV heads per layer"), _spread(mlp, "MLP channels per layer")):
        if text:
            problems.append(text)
    return problems


def _check_target(folder: Path) -> None:
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MARKER).exists())):
        raise BadInput(f"{folder} exists and is not an earlier export",
                       "choose a new --out folder (an existing one is replaced only if it is empty or holds "
                       f"{MARKER})")


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def plain_config(original: Any, recipe: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The original config with the (uniform) pruned sizes; and the sizes, for the report."""
    layers = recipe["layers"]
    config = copy.deepcopy(original)
    kv = len(layers[0]["attention"]["kept"])
    channels = len(layers[0]["mlp"]["kept"])
    sizes: dict[str, Any] = {}
    if kv != int(layers[0]["attention"]["original"]):
        heads, kv_heads = int(original.num_attention_heads), int(original.num_key_value_heads)
        if heads % kv_heads:
            raise BadInput(f"{heads} query heads do not split evenly over {kv_heads} KV heads", LOAD_PRUNED_FIX)
        config.head_dim = _head_dim(original)  # explicit: hidden_size / heads no longer gives it
        config.num_key_value_heads = kv
        config.num_attention_heads = kv * (heads // kv_heads)
    if channels != int(layers[0]["mlp"]["original"]):
        config.intermediate_size = channels
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size"):
        value = getattr(config, key, None)
        if value is not None:
            sizes[key] = int(value)
    return config, sizes


def _skeleton_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _block_of(key: str) -> str | None:
    parts = key.split(".")
    if "self_attn" in parts or "attention" in parts:
        return "attention"
    if "mlp" in parts or "feed_forward" in parts:
        return "mlp"
    return None


def _fit(config: Any, ours: dict[str, torch.Tensor]) -> tuple[Any, dict[str, tuple[int, ...]]]:
    """Switch on the bias flags our extra biases need; return the config and the biases to zero-fill."""
    expected = _skeleton_shapes(config)
    extra = [k for k in ours if k not in expected]
    flags = {"attention": "attention_bias", "mlp": "mlp_bias"}
    wanted = {_block_of(k) for k in extra if k.endswith(".bias")}
    switched = False
    for block in ("attention", "mlp"):
        flag = flags[block]
        if block in wanted and isinstance(getattr(config, flag, None), bool) and not getattr(config, flag):
            setattr(config, flag, True)
            switched = True
    if switched:
        expected = _skeleton_shapes(config)
        extra = [k for k in ours if k not in expected]
    problems: list[str] = []
    if extra:
        shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        problems.append(f"{type(config).__name__} has no place for {shown}"
                        + (" (compensation biases this architecture's config cannot switch on)"
                           if all(k.endswith(".bias") for k in extra) else ""))
    zero: dict[str, tuple[int, ...]] = {}
    for key, shape in expected.items():
        if key not in ours:
            if switched and key.endswith(".bias"):
                zero[key] = shape
            else:
                problems.append(f"{key} is missing from the pruned model")
        elif tuple(ours[key].shape) != shape:
            problems.append(f"{key} has shape {tuple(ours[key].shape)}, the config gives {shape}")
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        only_biases = bool(extra) and all(k.endswith(".bias") for k in extra) and len(problems) == 1
        raise BadInput(f"the pruned model does not fit a plain {type(config).__name__}: {shown}",
                       COMPENSATION_FIX if only_biases else LOAD_PRUNED)
    return config, zero


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Loading weights" / "Writing model shards" bars: our own messages say what happens."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _build_plain(config: Any, state: dict[str, torch.Tensor]) -> nn.Module:
    """The plain model of `config` holding our tensors (meta skeleton + assign: no second copy)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True gave tied names two Parameter objects over one tensor
    return model.eval()


def _verify(folder: Path, pruned: nn.Module, dtype: torch.dtype) -> float:
    """Load the written folder like a user would and compare its logits with the pruned model's."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False,
                                                  dtype=dtype).eval()
    vocab = int(pruned.config.vocab_size)  # type: ignore[attr-defined]
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = pruned(ids).logits.float()
        got = loaded(ids).logits.float()
    del loaded
    diff = float((want - got).abs().max())
    scale = float(want.abs().max()) or 1.0
    tolerance = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    if not diff <= tolerance * scale:
        raise RunFailed(f"the exported model's logits differ from the pruned model's (max |difference| {diff:.3g}, "
                        f"largest logit {scale:.3g}); nothing was written",
                        f"{LOAD_PRUNED}; please report this with the folder's config.json and pruning.json")
    return diff


def export_hf(source: Path, out: Path, *, verify: bool = True, say: Say | None = None) -> HFExport:
    """Write the plain Hugging Face folder of a uniformly pruned model (see the module docstring)."""
    from transformers import GenerationConfig

    from prune_core.export import load_pruned, read_recipe
    from prune_core.provenance import project_version

    say = say or (lambda _msg: None)
    model_dir = model_folder(Path(source))
    recipe = read_recipe(model_dir)
    problems = uniformity_problems(recipe)
    if problems:
        raise BadInput(f"{model_dir} cannot be a plain Hugging Face model: " + "; ".join(problems)
                       + " (a Hugging Face config has one KV-head count and one MLP width for all layers)",
                       LOAD_PRUNED_FIX)
    out = Path(out)
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise BadInput(f"--out {out} is inside the pruned model folder", "choose a folder outside it")
    _check_target(out)
    say(f"loading the pruned model from {model_dir}")
    pruned, tokenizer = load_pruned(model_dir, device="cpu")
    state = pruned.state_dict()
    config, sizes = plain_config(pruned.config, recipe)  # type: ignore[attr-defined]
    config, zero = _fit(config, state)
    dtype = next(pruned.parameters()).dtype
    full = dict(state)
    for key, shape in zero.items():
        full[key] = torch.zeros(shape, dtype=dtype)
    plain = _build_plain(config, full)
    if (model_dir / "generation_config.json").is_file():
        plain.generation_config = GenerationConfig.from_pretrained(str(model_dir), local_files_only=True)
    architecture = type(plain).__name__

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        say(f"writing {architecture} to {out}")
        with _quiet_transformers():
            plain.save_pretrained(str(tmp))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        atomic.usual_permissions(tmp, recursive=True)
        max_diff = None
        if verify:
            say("checking: loading it back with AutoModelForCausalLM.from_pretrained and comparing logits")
            with _quiet_transformers():
                max_diff = _verify(tmp, pruned, dtype)
        marker = {"format": MARKER_FORMAT, "format_version": 1, "prune_version": project_version(),
                  "source": str(model_dir.resolve()), "architecture": architecture, "sizes": sizes,
                  "zero_biases": sorted(zero), "verified_max_abs_logit_diff": max_diff,
                  "recipe_parameters": recipe.get("parameters")}
        atomic.flush_tree(tmp)
        atomic.write_json(tmp / MARKER, marker)
        atomic.swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    parameters = sum({p.data_ptr(): p.numel() for p in plain.parameters()}.values())  # tied tensors once
    return HFExport(out, model_dir, architecture, sizes, parameters, sorted(zero), max_diff)
