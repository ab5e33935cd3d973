"""The machine a benchmark runs on, and whether it was quiet enough for a figure to be published.

    from bench.machine import LoadMonitor, describe

    monitor = LoadMonitor()          # starts sampling at once (a daemon thread, 1 s period)
    with monitor.section("timing") as sec:
        ...                          # the measured work (this process and its children)
    print(sec.line(), sec.refusal(cores()))   # None when the figure may be written

The 1-minute load average of Linux counts every runnable thread, this benchmark's own included: a
pass running `torch.get_num_threads()` threads on as many cores keeps the load at about that number
on an idle machine. `LoadMonitor` therefore estimates the benchmark's own share of the load average
and reports the rest, the load of everybody else ("others"), next to the raw figure. The own share is
the kernel's exponential average (time constant 60 s) applied to the CPU time of this process and its
descendants, sampled every second: a thread that runs but waits for a core is counted as not
running, so under contention the own share is under-estimated and the others' load over-estimated
(the guard errs on the side of refusing). A section's figure is refused when the others' load, before
or after the section, exceeds the cores this process may use (its affinity set, or `os.cpu_count()`,
lowered by a cgroup CPU quota when there is one).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

TAU_S = 60.0  # time constant of the 1-minute load average
PERIOD_S = 1.0


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup quota (v2 cpu.max or v1 cfs_quota_us), None without a quota."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    return None


def cores() -> int:
    """The cores this process may run on: its affinity set (or os.cpu_count()), capped by a cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, math.ceil(quota))) if quota else n


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return (math.nan, math.nan, math.nan)


def facts(threads: int | None = None) -> dict[str, Any]:
    """CPU model, cores (usable / logical / physical), torch threads, OS, Python and the load average now."""
    if threads is None:
        import torch

        threads = torch.get_num_threads()
    return {
        "cpu_model": cpu_model(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "cgroup_cpu_quota": _cgroup_quota(),
        "torch_threads": threads,
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in loadavg()],
    }


def describe(info: dict[str, Any]) -> str:
    """One line from `facts()`."""
    phys = f", {info['physical_cores']} physical" if info.get("physical_cores") else ""
    quota = f", cgroup quota {info['cgroup_cpu_quota']:g} CPUs" if info.get("cgroup_cpu_quota") else ""
    return (f"{info['cpu_model']} ({info['arch']}), {info['cores']} usable cores of {info['cpu_count']} "
            f"logical{phys}{quota}, torch {info['torch_threads']} threads, {info['os']}, "
            f"Python {info['python']}")


def _own_cpu_seconds(me: psutil.Process) -> float:
    """CPU seconds of this process, its reaped descendants and its live descendants."""
    t = me.cpu_times()
    total = t.user + t.system
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    total += ru.ru_utime + ru.ru_stime
    with contextlib.suppress(psutil.Error):
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system + c.children_user + c.children_system
    return total


@dataclass
class Section:
    """The load around one measured section: raw 1-min load average and this benchmark's estimated share."""

    name: str
    cores: int
    load_before: float = math.nan
    own_before: float = 0.0
    load_after: float = math.nan
    own_after: float = 0.0
    seconds: float = math.nan
    own_cpu_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def others_before(self) -> float:
        return max(self.load_before - self.own_before, 0.0)

    @property
    def others_after(self) -> float:
        return max(self.load_after - self.own_after, 0.0)

    @property
    def others(self) -> float:
        """The highest load of the others, before or after the section."""
        return max(self.others_before, self.others_after)

    def refusal(self) -> str | None:
        """'load X > cores N' when the section's figures must not be written, else None."""
        if math.isnan(self.others):
            return "load average unknown"
        if self.others > self.cores:
            return f"load {self.others:.2f} > cores {self.cores}"
        return None

    def line(self) -> str:
        return (f"{self.name}: {self.seconds:.0f} s; load average (1 min) {self.load_before:.2f} → "
                f"{self.load_after:.2f}, of which this benchmark ≈ {self.own_before:.2f} → {self.own_after:.2f}; "
                f"others {self.others_before:.2f} → {self.others_after:.2f} (cores {self.cores})")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cores": self.cores, "seconds": round(self.seconds, 2),
                "load_before": round(self.load_before, 2), "load_after": round(self.load_after, 2),
                "own_before": round(self.own_before, 2), "own_after": round(self.own_after, 2),
                "others": round(self.others, 2), "own_cpu_s": round(self.own_cpu_s, 1),
                "refused": self.refusal()}


class LoadMonitor:
    """Samples this benchmark's CPU use every second into an estimate of its share of the load average."""

    def __init__(self, period_s: float = PERIOD_S) -> None:
        self.cores = cores()
        self._me = psutil.Process()
        self._lock = threading.Lock()
        self._period = period_s
        now = time.monotonic()
        elapsed = max(time.time() - self._me.create_time(), 1e-3)
        self._cpu = _own_cpu_seconds(self._me)
        # what this process did before the monitor started, spread evenly since its start
        self._own = min(self._cpu / elapsed, float(self.cores)) * (1.0 - math.exp(-elapsed / TAU_S))
        self._t = now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)
        self._thread.start()

    def _sample(self) -> float:
        with self._lock:
            now = time.monotonic()
            cpu = _own_cpu_seconds(self._me)
            dt = now - self._t
            if dt > 0:
                rate = max(cpu - self._cpu, 0.0) / dt
                decay = math.exp(-dt / TAU_S)
                self._own = self._own * decay + rate * (1.0 - decay)
                self._t = now
                self._cpu = max(cpu, self._cpu)
            return self._own

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self._sample()

    def own(self) -> float:
        """This benchmark's estimated share of the 1-minute load average now."""
        return self._sample()

    def stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[Section]:
        sec = Section(name=name, cores=self.cores)
        sec.own_before, sec.load_before = self.own(), loadavg()[0]
        cpu0, t0 = _own_cpu_seconds(self._me), time.perf_counter()
        try:
            yield sec
        finally:
            sec.seconds = time.perf_counter() - t0
            sec.own_cpu_s = _own_cpu_seconds(self._me) - cpu0
            sec.own_after, sec.load_after = self.own(), loadavg()[0]
