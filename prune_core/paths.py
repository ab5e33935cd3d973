"""Where prune keeps downloaded wheels, converted models and dataset text (platformdirs user cache).

`PRUNE_CACHE_DIR` overrides the location (tests and shared servers use it).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    root = os.environ.get("PRUNE_CACHE_DIR")
    path = Path(root) if root else Path(platformdirs.user_cache_dir("prune", appauthor=False))
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir() -> Path:
    path = cache_dir() / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def wheels_dir() -> Path:
    path = cache_dir() / "wheels"
    path.mkdir(parents=True, exist_ok=True)
    return path
