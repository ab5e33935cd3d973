"""ImportanceResult: the output of the importance pass, and its save/load (safetensors + JSON).

Everything the group table needs is here: raw group importance per layer (attention [L, kv_heads],
mlp [L, intermediate], float64), the first-order part for taylor_2nd, per-layer statistics (the
aggregate and the per-batch values), the input sums for bias compensation, and metadata (batch
size, token counts, identity, group counts per layer ...). If layers have different sizes (an
already pruned model) the [L, ...] tensors are NaN-padded: `metadata["attention_groups"]` /
`metadata["mlp_groups"]` give the real count per layer.

Definitions (see prune_core/importance/engine.py for the full contract):
    taylor      s = |w·ḡ|                  group = Σ s    (aggregation "element")
    taylor_2nd  s = |w·ḡ| + 0.5·w²·F        group = Σ s    ("vector": |Σ w·ḡ| + 0.5·Σ w²·F)
    wanda       s = |W_ij|·‖X_j‖₂           group = Σ s over the group's weight elements
    magnitude   group = sqrt(Σ w²) over all the group's parameters (data-free: 0 batches, 0 tokens)

On disk (`save(folder)`): importance.safetensors (tensors) and importance.json (the rest, plus the
sha256 of the tensor file). Each file is written atomically and the JSON last, so a folder with a
readable JSON whose checksum matches is a complete result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prune_core.atomic import write_json, write_with
from prune_core.digest import file_sha256
from prune_core.errors import RunFailed

ENGINE_VERSION = 1  # the importance pass's identity version (engine.py): a change makes old results stale

TENSORS_FILE = "importance.safetensors"
JSON_FILE = "importance.json"
FORMAT = "prune-importance-result"
VERSION = 1


@dataclass
class ImportanceResult:
    method: str  # a key of prune_core.importance.registry (taylor | taylor_2nd | wanda | magnitude)
    aggregation: str  # element | vector
    fisher_scale: str  # tokens | none
    attention: torch.Tensor  # float64 [L, kv_heads] raw group importance
    mlp: torch.Tensor  # float64 [L, intermediate]
    first_order: dict[str, torch.Tensor] | None  # taylor_2nd only: {"attention", "mlp"} first-order part
    stats: dict[str, dict[str, list[float]]]  # block -> stat -> [L], aggregated over batches
    stats_label: str  # the method's: "gradient" (taylor*), "activation" (wanda) or "weight" (magnitude)
    batch_stats: list[dict]  # per batch: {"loss": float, "stats": {...same shape as stats...}}
    input_sums: dict[str, torch.Tensor]  # {"o_proj": [L, in], "down_proj": [L, intermediate]} Σ inputs
    input_tokens: int  # tokens the input sums cover
    batches: int
    tokens: int
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)
    # the dense model's per-layer outputs on the calibration batches, recorded by the pass for the
    # reconstruction (prune_core/dense_stream.py); in memory only, never saved
    dense_stream: Any = field(default=None, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return int(self.attention.shape[0])

    def input_means(self) -> dict[str, torch.Tensor]:
        """Mean input of o_proj / down_proj per layer (input_sums / input_tokens)."""
        return {k: v / max(self.input_tokens, 1) for k, v in self.input_sums.items()}

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"attention": self.attention, "mlp": self.mlp}
        for k, v in (self.first_order or {}).items():
            out[f"first_order.{k}"] = v
        for k, v in self.input_sums.items():
            out[f"input_sums.{k}"] = v
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}

    def save(self, folder: Path) -> None:
        """Write importance.safetensors then importance.json (atomic each) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        write_with(folder / TENSORS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "tensors_sha256": file_sha256(folder / TENSORS_FILE),
            "method": self.method,
            "aggregation": self.aggregation,
            "fisher_scale": self.fisher_scale,
            "has_first_order": self.first_order is not None,
            "stats": self.stats,
            "stats_label": self.stats_label,
            "batch_stats": self.batch_stats,
            "input_tokens": self.input_tokens,
            "batches": self.batches,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "metadata": self.metadata,
        }
        write_json(folder / JSON_FILE, doc, default=str)

    @classmethod
    def load(cls, folder: Path) -> ImportanceResult:
        folder = Path(folder)
        json_path, tensor_path = folder / JSON_FILE, folder / TENSORS_FILE
        try:
            doc = json.loads(json_path.read_text(encoding="utf-8"))
            if doc.get("format") != FORMAT or doc.get("version") != VERSION:
                raise ValueError(f"not an importance result of format version {VERSION}")
            if file_sha256(tensor_path) != doc["tensors_sha256"]:
                raise ValueError(f"{TENSORS_FILE} does not match its checksum")
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # OSError, bad JSON, SafetensorError on a damaged file
            raise RunFailed(
                f"cannot read the importance result in {folder}: {exc}",
                f"delete {folder} to recompute the importance pass",
            ) from exc
        first_order = (
            {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("first_order.")}
            if doc["has_first_order"]
            else None
        )
        input_sums = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("input_sums.")}
        return cls(
            method=doc["method"],
            aggregation=doc["aggregation"],
            fisher_scale=doc["fisher_scale"],
            attention=tensors["attention"],
            mlp=tensors["mlp"],
            first_order=first_order,
            stats=doc["stats"],
            stats_label=doc["stats_label"],
            batch_stats=doc["batch_stats"],
            input_sums=input_sums,
            input_tokens=int(doc["input_tokens"]),
            batches=int(doc["batches"]),
            tokens=int(doc["tokens"]),
            seconds=float(doc["seconds"]),
            metadata=doc.get("metadata", {}),
        )
