"""The recovery fine-tuning's checkpoint on disk: safetensors and JSON, every file's sha256 in a manifest.

`CheckpointStore(folder)` saves a checkpoint as new files first (each written atomically), then switches
`manifest.json` to them, then removes the old ones, so a kill at any moment leaves one whole checkpoint;
`load()` refuses a file that is missing or does not match its checksum (RunFailed naming the file and
`--fresh`). `optimizer_state` / `load_optimizer` turn AdamW's state into flat tensors plus a JSON index
and back: nothing is pickled. recovery.py decides what goes in (see its docstring).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prune_core import atomic
from prune_core.digest import file_sha256, read_manifest
from prune_core.errors import RunFailed

FORMAT = "prune-recovery-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"

__all__ = ["FORMAT", "MANIFEST", "VERSION", "Checkpoint", "CheckpointStore", "load_optimizer", "optimizer_state",
           "restore_training"]


@dataclass
class Checkpoint:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


class CheckpointStore:
    """The checkpoint of one recovery run: safetensors + JSON, each file's sha256 in the manifest."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def damaged(self, name: str, what: str) -> RunFailed:
        return RunFailed(f"the recovery checkpoint file {self.folder / name} {what}, so it cannot be resumed safely",
                         f"run again with --fresh to start the fine-tuning over (or delete {self.folder})")

    def exists(self) -> bool:
        return (self.folder / MANIFEST).exists()

    def load(self) -> Checkpoint | None:
        manifest = read_manifest(self.folder / MANIFEST, lambda why: self.damaged(MANIFEST, why))
        if manifest is None:
            return None
        if manifest.get("format") != FORMAT:
            raise self.damaged(MANIFEST, "is not a recovery checkpoint manifest")
        if manifest.get("version") != VERSION:
            raise self.damaged(MANIFEST, f"has format version {manifest.get('version')!r}, this version reads {VERSION}")
        sums, names = manifest.get("sha256"), (manifest.get("meta"), manifest.get("tensors"))
        if not isinstance(sums, dict) or not all(isinstance(n, str) and "/" not in n and n for n in names):
            raise self.damaged(MANIFEST, "lists no checksums (edited, or written by another version)")
        for name in names:
            assert isinstance(name, str)
            if not (self.folder / name).is_file():
                raise self.damaged(name, "is missing")
            if file_sha256(self.folder / name) != sums.get(name):
                raise self.damaged(name, "is corrupt: it does not match its sha256 in manifest.json")
        meta_name, tensor_name = str(names[0]), str(names[1])
        try:
            meta = json.loads((self.folder / meta_name).read_text(encoding="utf-8"))
            tensors = load_file(str(self.folder / tensor_name), device="cpu")
        except Exception as exc:  # safetensors raises its own error type on a damaged file
            raise self.damaged(tensor_name, f"cannot be read ({exc})") from exc
        if not isinstance(meta, dict):
            raise self.damaged(meta_name, "is not a JSON object")
        return Checkpoint(meta=meta, tensors=tensors)

    def save(self, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Path:
        """New files first (each atomic), then the manifest switches to them, then the old files go."""
        seq = 1
        with contextlib.suppress(OSError, ValueError, AttributeError):
            seq = int(json.loads((self.folder / MANIFEST).read_text(encoding="utf-8")).get("seq", 0)) + 1
        names = {"tensors": f"state-{seq:06d}.safetensors", "meta": f"meta-{seq:06d}.json"}
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        atomic.write_with(self.folder / names["tensors"], lambda tmp: save_file(cpu, str(tmp)))
        atomic.write_json(self.folder / names["meta"], meta)
        sums = {n: file_sha256(self.folder / n) for n in names.values()}
        atomic.write_json(self.folder / MANIFEST, {"format": FORMAT, "version": VERSION, "seq": seq, **names,
                                                   "sha256": sums})
        self._remove(keep=set(names.values()))
        return self.folder / MANIFEST

    def _remove(self, keep: set[str]) -> None:
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if path.name.startswith(("state-", "meta-", ".state-", ".meta-")) and path.name not in keep:
                path.unlink(missing_ok=True)

    def clear(self) -> None:
        self._remove(keep=set())
        (self.folder / MANIFEST).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()



def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """AdamW's state_dict as flat tensors (`optim.<i>.<key>`) plus a JSON index of everything else."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for idx, entry in sd["state"].items():
        values: dict[str, Any] = {}
        names: list[str] = []
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
                names.append(key)
            else:
                values[key] = value
        state[str(idx)] = {"tensors": names, "values": values}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"state": state, "param_groups": groups}


def load_optimizer(opt: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], index: Any,
                    store: CheckpointStore, meta_name: str) -> None:
    try:
        state = {int(i): {**e["values"], **{k: tensors[f"optim.{i}.{k}"] for k in e["tensors"]}}
                 for i, e in index["state"].items()}
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in index["param_groups"]]
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise store.damaged(meta_name, f"does not describe this optimizer ({type(exc).__name__}: {exc})") from exc


def restore_training(checkpoint: Checkpoint, store: CheckpointStore, named: Sequence[tuple[str, torch.Tensor]],
                     opt: torch.optim.Optimizer, steps: int, prefix: str, noun: str) -> tuple[int, list[float]]:
    """Load a training checkpoint's parameters (tensors `<prefix>.<name>`) and optimizer state.

    Returns (next step, losses so far). Refuses, naming the meta file: a next step outside 1..steps−1,
    a loss list of another length, a missing or reshaped parameter (`noun` names what one is).
    """
    what = "meta file"
    start, losses = checkpoint.meta.get("next_step"), checkpoint.meta.get("losses")
    if not isinstance(start, int) or isinstance(start, bool) or not 0 < start < steps:
        raise store.damaged(what, f"names step {start!r}, not one of 1..{steps - 1}")
    if not isinstance(losses, list) or len(losses) != start:
        raise store.damaged(what, f"holds {len(losses) if isinstance(losses, list) else 'no'} losses for "
                                  f"{start} steps done")
    with torch.no_grad():
        for name, p in named:
            saved = checkpoint.tensors.get(f"{prefix}.{name}")
            if saved is None or saved.shape != p.shape:
                raise store.damaged(what, f"has no {noun} {name} of shape {tuple(p.shape)}")
            p.copy_(saved.to(device=p.device, dtype=p.dtype))
    load_optimizer(opt, checkpoint.tensors, checkpoint.meta.get("optimizer"), store, what)
    return start, [float(v) for v in losses]
