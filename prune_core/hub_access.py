"""Whether the Hugging Face hub may and can be used from here: the offline switches, the endpoint, probes.

Why one place: loading a model (models.py), a hub text (datasources/hub.py) and lm-eval tasks
(zeroshot.py) all ask the same questions before they reach out — has the user asked to stay offline,
and does the hub answer — and a machine without network must fail in seconds with a fix, not hang.

- `offline(datasets=...)`: `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE` set to 1/true/yes/on (any case;
  `HF_DATASETS_OFFLINE` too for data), or huggingface_hub's own offline constant.
- `endpoint()`: `HF_ENDPOINT` (default https://huggingface.co), without a trailing slash.
- `models_reachable(timeout)`: a TCP connection to the endpoint's host (with a proxy configured the
  direct probe says nothing, so the hub is assumed reachable).
- `dataset_reachable(repo, timeout)`: a GET of the dataset's API page through the environment's
  proxies; only a real answer counts (2xx/3xx, or 401/403: auth problems are left to `datasets`),
  a 404 or 5xx (a captive portal, an intercepting proxy, a broken mirror) is unreachable. It runs in
  a daemon thread (getaddrinfo ignores socket timeouts) and its answer is remembered for
  `PROBE_TTL_S` seconds.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
PROBE_TTL_S = 60.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_HUB_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

__all__ = ["PROBE_TIMEOUT_S", "dataset_reachable", "endpoint", "models_reachable", "offline"]


def offline(*, datasets: bool = False) -> bool:
    """The user asked for no network (module docstring)."""
    names = (*_HUB_VARS, "HF_DATASETS_OFFLINE") if datasets else _HUB_VARS
    if any(os.environ.get(name, "").strip().upper() in _TRUE for name in names):
        return True
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def models_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A quick TCP probe of the hub endpoint (True when a proxy is configured: see the module docstring)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


_probe_lock = threading.Lock()
_probe_cache: dict[str, tuple[float, bool]] = {}


def dataset_reachable(repo: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub answers for dataset `repo` within `timeout` seconds (module docstring)."""
    url = f"{endpoint()}/api/datasets/{repo}"
    with _probe_lock:
        hit = _probe_cache.get(url)
        if hit is not None and time.monotonic() - hit[0] < PROBE_TTL_S:
            return hit[1]
    result: list[bool] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as response:
                result.append(200 <= response.status < 400)
        except urllib.error.HTTPError as exc:
            result.append(exc.code in (401, 403))
        except Exception:
            result.append(False)

    worker = threading.Thread(target=probe, name="prune-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    reachable = bool(result and result[0])
    with _probe_lock:
        _probe_cache[url] = (time.monotonic(), reachable)
    return reachable
