"""A back-of-the-envelope time and memory estimate for the importance pass, shown before anything runs.

Time ≈ FLOPs / throughput, with FLOPs ≈ tokens × params × 6 for a forward + backward pass (methods
that need gradients) or × 2 for forward only (wanda), plus the attention term that grows with
seq_len; a data-free method (magnitude) reads the weights once. What a method needs comes from the
importance-method registry (prune_core/importance/registry.py).
Memory ≈ weights + gradients + Fisher diagonal (taylor_2nd, fp32 over prunable weights)
+ activations (∝ batch × seq_len, per layer s·b·h·(34 + 5·a·s/h) bytes at 16 bits) + logits.
These are rough by design: they show the trade-off between choices, not a promise.

`around_pass` prices the stages on either side of the pass that grow with the session's choices, at
the same effective throughput as the pass: generating `generated_samples` windows token by token
(forward only, but small batches and one token per step: `GENERATION_SLOWDOWN` × its FLOP cost) and
`[distill] steps` (a forward and backward of the pruned model plus a forward of the dense teacher).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prune_core.importance.registry import DEFAULT_METHOD, METHODS

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_EFFICIENCY = 0.5          # share of the measured matmul throughput a real pass reaches
GPU_FLOPS = 20e12             # assumed effective throughput on a GPU
ASSUMED_CPU_FLOPS = 20e9      # when nothing was measured
# Sampling from smollm2-135m on 2 CPU cores, 64 sequences at a time (selfgen.BATCH_SIZE): 128 × 128 tokens
# in about 88 s beside an 85 s taylor pass over 160 windows: about 4× the FLOP cost of the same tokens'
# forward passes (16 at a time it was 6.4×: 144 s).
GENERATION_SLOWDOWN = 4.0
DISTILL_PASSES = 4.0          # student forward + backward (3) + teacher forward (1), per token


@dataclass(frozen=True)
class Geometry:
    """What the estimate needs to know about the model; `exact` is False when guessed from a size."""

    parameters: int
    prunable: int
    layers: int
    hidden: int
    heads: int
    vocab: int = 32000
    exact: bool = True

    @classmethod
    def guess(cls, parameters: int) -> Geometry:
        """Rough geometry of a LLaMA-like model with this many parameters (params ≈ 12·L·h²)."""
        layers = 12 if parameters < 50e6 else 24 if parameters < 1e9 else 32
        hidden = max(64, int(math.sqrt(max(parameters, 1) / (12 * layers)) // 64 * 64) or 64)
        return cls(parameters=parameters, prunable=int(parameters * 0.8), layers=layers, hidden=hidden,
                   heads=max(1, hidden // 64), exact=False)


@dataclass(frozen=True)
class Estimate:
    seq_len: int
    tokens: int
    seconds: float
    memory_bytes: int
    flops: float


def estimate(geo: Geometry, *, method: str, seq_len: int, num_samples: int, batch_size: int,
             dtype: str = "float32", gpu: bool = False, cpu_flops: float | None = None,
             gradient_checkpointing: bool = False, measured: tuple[float, int] | None = None) -> Estimate:
    """Estimate one importance pass for the given settings.

    `measured` = (tokens/s, seq_len) of a pass of this model and method that really ran (the last
    run's speed): the time is then calibrated on it instead of on FLOP counts and a machine guess.
    """
    spec = METHODS.get(method) or METHODS[DEFAULT_METHOD]  # the registry says what the method needs
    tokens = seq_len * num_samples if spec.needs_calibration else 0
    backward = spec.needs_gradients
    per_token = 2 * geo.parameters + 4 * geo.layers * seq_len * geo.hidden  # forward: weights + attention
    flops = tokens * per_token * (3 if backward else 1)
    if backward and gradient_checkpointing:
        flops *= 4 / 3  # one extra forward
    throughput = GPU_FLOPS if gpu else (cpu_flops or ASSUMED_CPU_FLOPS) * CPU_EFFICIENCY
    if not spec.needs_calibration:
        flops = 2.0 * geo.prunable  # data-free: one pass over the prunable weights
    seconds = flops / max(throughput, 1.0)
    if measured is not None and measured[0] > 0 and tokens:
        tps, at_seq = measured
        at = 2 * geo.parameters + 4 * geo.layers * max(at_seq, 1) * geo.hidden  # cost per token where measured
        seconds = tokens / tps * per_token / at

    width = BYTES.get(dtype, 4)
    weights = geo.parameters * width
    grads = geo.parameters * width if backward else 0
    fisher = geo.prunable * 4 if spec.needs_fisher else 0
    s, b, h, a = seq_len, batch_size, geo.hidden, geo.heads
    per_layer = s * b * h * (34 + 5 * a * s / h) * width / 2
    if not backward:
        activations = per_layer  # nothing is kept for a backward pass
    elif gradient_checkpointing:
        activations = s * b * h * width * geo.layers + per_layer
    else:
        activations = per_layer * geo.layers
    logits = b * s * geo.vocab * 4 * (2 if backward else 1)
    if not spec.needs_calibration:
        activations = logits = 0  # no forward pass
    memory = int(weights + grads + fisher + activations + logits)
    return Estimate(seq_len=seq_len, tokens=tokens, seconds=seconds, memory_bytes=memory, flops=flops)


@dataclass(frozen=True)
class AroundPass:
    generation_seconds: float
    distill_seconds: float


def around_pass(geo: Geometry, chosen: Estimate, *, generated_samples: int, distill_steps: int,
                distill_batch_size: int) -> AroundPass:
    """Generation before and distillation after the pass, at the pass's own effective throughput."""
    s = chosen.seq_len
    forward_per_token = 2 * geo.parameters + 4 * geo.layers * s * geo.hidden
    if chosen.tokens and chosen.seconds > 0 and chosen.flops > 0:
        throughput = chosen.flops / chosen.seconds
    else:  # a data-free method measured nothing useful: fall back on the machine guess
        throughput = ASSUMED_CPU_FLOPS * CPU_EFFICIENCY
    gen = max(generated_samples, 0) * s * forward_per_token * GENERATION_SLOWDOWN / throughput
    dist = max(distill_steps, 0) * max(distill_batch_size, 1) * s * forward_per_token * DISTILL_PASSES / throughput
    return AroundPass(generation_seconds=gen, distill_seconds=dist)


def trade_off(geo: Geometry, *, seq_lens: tuple[int, ...] = (128, 256, 512), **kwargs: object) -> list[Estimate]:
    """The same estimate at several sequence lengths (number of windows unchanged)."""
    return [estimate(geo, seq_len=s, **kwargs) for s in seq_lens]  # type: ignore[arg-type]


def human_seconds(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}"
