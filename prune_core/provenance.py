"""What a results folder records about where a run came from: versions, git hash, device, inputs."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from prune_core import distributed


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def project_version() -> str:
    return _version("prune-workbench")


def git_hash() -> str:
    """The commit of the prune checkout this code runs from, or "" when not a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    if out.returncode != 0:
        return ""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def world_size() -> int:
    """The number of processes that shared the run (torch.distributed), else WORLD_SIZE, else 1."""
    joined = distributed.provenance()
    if joined["world_size"] > 1:
        return int(joined["world_size"])
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def ranks() -> dict[str, Any]:
    """backend and devices of the ranks when several processes shared the run (nothing otherwise)."""
    joined = distributed.provenance()
    if joined["world_size"] <= 1:
        return {}
    return {"distributed_backend": joined["backend"], "devices": joined["devices"]}


def base_provenance() -> dict[str, Any]:
    return {
        "project": "prune",
        "project_version": project_version(),
        "git": git_hash(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "datasets": _version("datasets"),
        "world_size": world_size(),
        **ranks(),
    }
