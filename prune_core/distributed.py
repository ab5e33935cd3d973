"""Data-parallel passes on torch.distributed: who this process is, and the few collectives the passes use.

Why: the importance pass and the block losses read every calibration batch, and their results are
plain sums over batches, so N processes (one per GPU, or N CPU processes) can each read every N-th
batch and add their partial sums with an all-reduce. Nothing here is a scheme of our own: the
process group is torch.distributed's, started from the environment that `torchrun`,
`accelerate launch` or SLURM's `srun` set up.

Detection (`detect`): RANK and WORLD_SIZE (torchrun, accelerate launch), or SLURM_PROCID and
SLURM_NTASKS when MASTER_ADDR and MASTER_PORT are exported too (srun; without them SLURM's variables
are ignored, since a batch script sets them for every job). A world of one process is not
distributed: nothing is initialised and every pass runs exactly as before.

`setup(device)` initialises the default process group once per process: the "nccl" backend when the
session's device is CUDA (each rank's device is cuda:LOCAL_RANK), "gloo" otherwise. It then gathers
every rank's device name, for the provenance of the results folder.

The split is deterministic: batch i belongs to rank i % world (`World.owns`). Passes work in rounds
of `world` consecutive batches, so after every round the batches done by all ranks together form a
prefix [0, k) of the batches: that is what checkpoints record and what progress events count.
Rank 0 alone writes (results folder, stage cache, checkpoints, event log, lock); the others report
nothing and follow rank 0's decisions (`follow`/`announce`). Between the collective stages rank 0
runs the stages of its own (proxy, diagnosis, evaluation) with the world released (`release`,
`rejoin`), while the others wait for its next decision: hence the long `TIMEOUT` of the group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from prune_core.errors import BadInput, Interrupted, PruneError, RunFailed

_ERRORS: dict[str, type[PruneError]] = {"BadInput": BadInput, "RunFailed": RunFailed, "Interrupted": Interrupted}
# How long a collective may wait for the slowest rank: the other ranks wait for rank 0's decision
# while it runs the proxy, the diagnosis and the evaluation alone (torch's default is 10-30 minutes).
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (rank 0 of a world of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""
    devices: tuple[str, ...] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        """Several processes share the work (a world of one behaves exactly like no torch.distributed)."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Batch `index` is read by this rank."""
        return index % self.size == self.rank

    # collectives ---------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_(self, tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
        """In-place all-reduce of every tensor (op "sum", "max" or "min"); no-op in a world of one.

        Each tensor is reduced in place (no flat copy of all of them: the sums of a large model are
        big); a tensor on another device than the backend's (a CPU-kept Fisher under nccl) travels
        through a temporary copy.
        """
        if not self.active or not tensors:
            return
        reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        comm = self._comm_device()
        for t in tensors:
            if t.device == comm and t.is_contiguous():
                dist.all_reduce(t, op=reduce_op)
                continue
            moved = t.to(comm).contiguous()
            dist.all_reduce(moved, op=reduce_op)
            with torch.no_grad():
                t.copy_(moved.to(t.device))

    def sum_numbers(self, values: Sequence[float]) -> list[float]:
        """Σ over ranks of a few numbers (float64)."""
        t = torch.tensor(list(values), dtype=torch.float64)
        self.all_reduce_([t])
        return t.tolist()

    def any_of(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all ranks (all-reduce MAX): a stop asked on any rank stops them all."""
        t = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64)
        self.all_reduce_([t], op="max")
        return tuple(bool(v) for v in t.tolist())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


_WORLD = World()
_RELEASED = False  # the collective stages are over: this rank goes on alone (rank 0) or is done


def detect(env: dict[str, str] | None = None) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from a launcher's environment, or None when not launched by one."""
    env = dict(os.environ) if env is None else env

    def number(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise BadInput(f"the launcher's environment variable {name}={env[name]!r} is not a number",
                           "launch with torchrun, accelerate launch or srun, which set it") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        rank, size = number("RANK"), number("WORLD_SIZE")
        local = number("LOCAL_RANK") if "LOCAL_RANK" in env else rank
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env:
        rank, size = number("SLURM_PROCID"), number("SLURM_NTASKS")
        local = number("SLURM_LOCALID") if "SLURM_LOCALID" in env else rank
    else:
        return None
    if size < 1 or not 0 <= rank < size:
        raise BadInput(f"rank {rank} does not fit a world of {size} processes", "check the launcher's settings")
    return rank, size, local


def _wants_cuda(device: str) -> bool:
    name = (device or "auto").strip().lower()
    return torch.cuda.is_available() and (name == "auto" or name.startswith("cuda"))


def setup(device: str = "auto") -> World:
    """Join the process group the launcher set up (once per process) and return this rank's World.

    Not launched by torchrun / accelerate / srun, or a world of one: returns World() and touches
    nothing, so a single-process run is exactly what it always was.
    """
    global _WORLD
    if _WORLD.active:
        return world()
    found = detect()
    if found is None or found[1] == 1:
        return _WORLD
    rank, size, local = found
    if not dist.is_available():
        raise BadInput("this torch build has no torch.distributed", "install a standard torch build")
    backend = "nccl" if _wants_cuda(device) else "gloo"
    if backend == "nccl":
        count = torch.cuda.device_count()
        if local >= count:
            raise BadInput(f"local rank {local} has no GPU: this node has {count}",
                           f"start at most {count} processes per node (--nproc_per_node {count})")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=size,
                                timeout=TIMEOUT)
    else:
        backend = str(dist.get_backend())
    here = f"cuda:{local} ({torch.cuda.get_device_name(local)})" if backend == "nccl" else "cpu"
    partial = World(rank=rank, size=size, local_rank=local, backend=backend)
    devices = tuple(str(d) for d in partial.gather(here))
    _WORLD = World(rank=rank, size=size, local_rank=local, backend=backend, devices=devices)
    return _WORLD


def world() -> World:
    """The World the passes share: World() until `setup` joined a group of several processes, and again
    after `release` until `rejoin` (rank 0 then runs its own stages alone, with no collective calls)."""
    return World() if _RELEASED else _WORLD


def release() -> None:
    """A collective stage is over for this rank: the passes that follow run as a single process."""
    global _RELEASED
    _RELEASED = _WORLD.active


def rejoin() -> None:
    """The next collective stage starts: the passes share the work of all ranks again (after `release`)."""
    global _RELEASED
    _RELEASED = False


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined)."""
    global _WORLD, _RELEASED
    if _WORLD.active and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD, _RELEASED = World(), False


def provenance() -> dict[str, Any]:
    """What the results folder records about the ranks that shared the run (also after `release`)."""
    w = _WORLD
    return {"world_size": w.size, "backend": w.backend, "devices": list(w.devices)}


# ------------------------------------------------------------------------------------------------ followers
def announce(w: World, decision: str, error: BaseException | None = None) -> None:
    """Rank 0 tells the other ranks what comes next: "compute", "skip", or "abort" with its error."""
    if not w.active:
        return
    what = None
    if error is not None:
        kind = type(error).__name__ if type(error).__name__ in _ERRORS else "RunFailed"
        message = error.message if isinstance(error, PruneError) else str(error) or type(error).__name__
        fix = error.fix if isinstance(error, PruneError) else None
        what = (kind, f"rank 0 stopped: {message}", fix)
    w.broadcast((decision, what))


def follow(w: World) -> bool:
    """A rank other than 0 waits for rank 0's next decision: True to compute, False to skip; raises
    rank 0's error on "abort" (the same kind: Interrupted, BadInput or RunFailed)."""
    decision, what = w.broadcast(None)
    if decision == "abort":
        kind, message, fix = what
        raise _ERRORS[kind](message, fix)
    return decision == "compute"
