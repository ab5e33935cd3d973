"""Memory plan: what each importance method needs for a model, computed from its config alone.

Why: a 7–8B model on one 48 GB GPU, or a 70B model anywhere, runs out of memory in the middle of the
importance pass, after minutes of loading. `prune plan SESSION.toml` answers before anything loads:
the model is built on the meta device from its config (`AutoModelForCausalLM.from_config` under
`torch.device("meta")`: shapes, no weights, no memory, trust_remote_code never on), the scored
parameters are those the engine scores (`prune_core.importance.groups.prunable_targets` through the
family's adapter), and the buffers are those the engine allocates, at their real dtypes.

Symbols (bytes unless said): e = bytes per element of the session's dtype (4 float32, 2 bfloat16 /
float16); T = batch_size × seq_len tokens of one batch; h hidden size, L layers, n_h query heads,
q = n_h × head_dim, kv = n_kv × head_dim, I MLP width, V vocabulary; P all parameters (tied embeddings
once), P_s the scored parameters (q/k/v/o, gate/up/down weights and q/k/v biases where present).

    weights              W  = P · e
    gradients            G  = P_s · e            p.grad of the scored parameters during one backward (on a
                                             CPU the pass sums them inside the GEMM instead, fused_linear.py:
                                             there G is an upper bound, taylor_2nd keeping one tensor's worth)
    Σg                   Sg = P_s · 4            float32 sum of the gradients (taylor, taylor_2nd)
    Σ n·g² (Fisher)      F  = P_s · 4            taylor_2nd only; on the CPU with hessian_device = "cpu"
    scratch              2 · max(scored tensor) · 4   |g| buffer of the hooks + the last batch's scores
    input statistics     L · (q + I) · 8          float64 input sums of o_proj / down_proj (every pass)
                         + L · (5h + q + I) · 8   wanda: Σx² per input feature of every sliced linear

Activations saved for backward, per layer, by the eager LLaMA/Mistral/Qwen2 layer with sdpa (no
padding mask, so sdpa's flash / memory-efficient kernel keeps q, k, v, out and a float32 logsumexp;
grouped-query K/V are not expanded), with only the scored parameters requiring gradients:

    a = T · [ e·(2h + 2q + 2kv + 4I) + 4·2h + 2·4 + 4·n_h ]
        e·2h: the two RMSNorm outputs fed to q/k/v and gate/up; e·(q + 2kv): q, k after RoPE and v;
        e·q: the attention output (o_proj's input); e·4I: gate, SiLU(gate), up and their product
        (down_proj's input); 4·2h + 2·4: each RMSNorm keeps its float32 input and its rsqrt;
        4·n_h: sdpa's logsumexp.
    A  = L·a − T·(4h + 4)   (layer 0's input is the frozen embedding output: its norm keeps nothing)
    A_ckpt = L · T · h · e  with gradient checkpointing (each layer keeps its input only)
    loss head  H = 3 · T · V · 4 + T · (4h + 12)
        the float32 log-softmax that cross-entropy keeps, and during its backward the gradients with
        respect to its output and input (all T × V, float32), plus the final norm and the labels.

Peak of a gradient pass (the batches after the first, when Σg already exists beside fresh gradients),
with t = 2 · T · I · e the gradients one layer's backward holds at once (of its MLP's T × I tensors):

    W + Sg + F + scratch + stats + max(A + max(H, t), G + a + t)           without checkpointing
    W + Sg + F + scratch + stats + max(A_ckpt + max(H, a + t), G + a + t)  with checkpointing

(the backward frees each layer's activations as it creates that layer's gradients, so the peak is
at its start — all activations and the loss head — or at its end — all gradients and one layer's
working set; with checkpointing each layer's activations are recomputed during its backward). wanda runs forward passes without gradients: W + stats + T·I·4 (its |x| scratch) +
the larger of one layer's forward working set T·(e·(2h + q + 2kv + 3I) + 4·2I) and the loss head
T·V·(e + 8) (logits, their float32 copy and the log-softmax). magnitude reads the weights only:
W + 2 · max(scored tensor) · 4.

Reconstruction (pruning.compensate = "reconstruct") keeps one Gram matrix at a time, in float64,
for the wider of o_proj (n = q inputs) and down_proj (n = I): the accumulator n·k·8 for the k kept
inputs, the augmented (n+1)²·8 matrix and the (k+1)²·8 system it solves; plus the calibration stream
(num_samples + generated_samples) × seq_len × h × e of hidden states, four of them with error feedback
(the dense stream, after the layer's attention and after the layer), one more for a layer's new
outputs, and the down_proj inputs and outputs when they fit under reconstruct.py's 1 GiB limit
(`stream_bytes`); with error feedback on a CPU, also the dense stream the importance pass recorded
(every layer's output of every window, held from the pass through the surgery; `recorded_stream_bytes`,
0 beyond dense_stream.py's budget of min(2 GiB, RAM / 8)). Generating windows holds one batch's key/value cache and logits (`generation_bytes`).

Validated (tests/test_plan.py, README "Memory"): the parameter and buffer counts exactly against the
Llama-3-8B / 70B configs; the saved-activation formula exactly, byte for byte, against the tensors
autograd saves for a small Llama (saved-tensor hooks); and the predicted peak of a real importance
pass against the peak RSS of a fresh process (tiny-llama; smollm2-135m when cached), within the
tolerance stated there. Other families (Gemma's extra norms, Qwen3's q/k norms, fused Phi-3
projections) are planned with the same per-layer formula: their figures are approximate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune_core.diskplan import disk_bytes, free_bytes
from prune_core.errors import BadInput
from prune_core.memplan_geometry import Geometry, geometry_from_config, load_config
from prune_core.selfgen import BATCH_SIZE as GENERATION_BATCH

GIB = 1024**3
MIB = 1024**2
FP32 = 4
FP64 = 8
# the engine keeps the Fisher diagonal on the CPU when the device has less free than this (engine.py)
FISHER_FREE_FACTOR = 1.5
FISHER_FREE_MARGIN = GIB
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# --------------------------------------------------------------------------------------------------
# the formulas


def activation_per_layer(g: Geometry, tokens: int, e: int) -> int:
    """a: bytes autograd keeps for one decoder layer (see the module docstring)."""
    h, q, kv, inter = g.hidden, g.q, g.kv, g.intermediate
    return tokens * (e * (2 * h + 2 * q + 2 * kv + 4 * inter) + FP32 * 2 * h + 2 * FP32 + FP32 * g.heads)


def activations(g: Geometry, tokens: int, e: int, checkpointing: bool) -> int:
    """A (or A_ckpt): the layers' saved activations of one batch."""
    if checkpointing:
        return g.layers * tokens * g.hidden * e
    return g.layers * activation_per_layer(g, tokens, e) - tokens * (FP32 * g.hidden + FP32)


def layer_backward(g: Geometry, tokens: int, e: int) -> int:
    """t: the gradients one layer's backward holds at once (two of its MLP's T × I tensors)."""
    return 2 * tokens * g.intermediate * e


def loss_head(g: Geometry, tokens: int) -> int:
    """H: cross-entropy over the vocabulary at its backward's start, plus the final norm and labels."""
    return 3 * tokens * g.vocab * FP32 + tokens * (FP32 * g.hidden + FP32 + 8)


def input_stats(g: Geometry, squares: bool) -> int:
    """float64 input sums of o_proj/down_proj (every data pass); wanda's Σx² per input feature too."""
    sums = g.layers * (g.q + g.intermediate) * FP64
    if squares:
        sums += g.layers * (5 * g.hidden + g.q + g.intermediate) * FP64
    return sums


def gram_bytes(g: Geometry, ratio: float) -> dict[str, int]:
    """Reconstruction: one float64 Gram matrix at a time (the wider of o_proj and down_proj), fed through a
    float32 buffer of the same shape (the batches' products, reconstruct.py `_Sum`)."""
    n = max(g.q, g.intermediate)
    kept = max(1, round(n * (1.0 - ratio)))
    acc, partial = n * kept * FP64, n * kept * FP32
    augmented, system = (n + 1) ** 2 * FP64, (kept + 1) ** 2 * FP64
    return {"inputs": n, "kept": kept, "accumulator": acc, "partial": partial, "augmented": augmented,
            "system": system, "total": acc + partial + augmented + system}


def recorded_stream_bytes(g: Geometry, *, dtype: str, windows: int, seq_len: int, blocks: str) -> int:
    """The dense stream a CPU importance pass records for error feedback (prune_core/dense_stream.py):
    every layer's output (and its stream after the attention unless only MLPs are pruned, where that
    fits) for every window; 0 when even the outputs exceed the recording budget, where reconstruction
    recomputes them instead."""
    from prune_core import dense_stream

    size = (windows, seq_len, g.hidden, g.layers, _DTYPE_BYTES[dtype])
    mids = dense_stream.fitting_mids(*size, blocks != "mlp")
    return 0 if mids is None else dense_stream.stream_bytes(*size, mids)


def stream_bytes(g: Geometry, *, dtype: str, windows: int, seq_len: int, error_feedback: float) -> dict[str, int]:
    """Reconstruction's activations (compensation/reconstruct.py): the calibration stream of hidden states of
    every window (dataset and generated), kept between layers; with error feedback also the dense stream and
    the dense stream after the current layer's attention and after the layer (3 more); while a layer runs,
    its new outputs (one more stream); and, when they fit under its 1 GiB limit, the down_proj inputs and
    outputs of all tokens (saves a forward per layer): the kept inputs and the stream after the attention,
    counted here at all inputs (an upper bound)."""
    from prune_core.compensation.reconstruct import STORE_LIMIT_BYTES

    e = _DTYPE_BYTES[dtype]
    tokens = windows * seq_len
    one = tokens * g.hidden * e
    streams = 4 if error_feedback > 0 else 1
    stored_in = tokens * g.intermediate * e
    stored = stored_in + one if stored_in <= STORE_LIMIT_BYTES else 0
    return {"windows": windows, "stream": one, "streams": streams, "layer_outputs": one, "stored": stored,
            "total": streams * one + one + stored}


def generation_bytes(g: Geometry, *, dtype: str, seq_len: int, batch_size: int) -> dict[str, int]:
    """Generating calibration windows (selfgen.py, `[data] generated_samples`): the key/value cache of one
    batch of `batch_size` sequences of seq_len + 1 tokens in every layer, and the float32 logits of the
    step (HF's sampling keeps the processed scores and the probabilities beside them: three copies)."""
    e = _DTYPE_BYTES[dtype]
    cache = 2 * g.layers * batch_size * (seq_len + 1) * g.kv * e
    logits = 3 * batch_size * g.vocab * FP32
    return {"batch_size": batch_size, "kv_cache": cache, "logits": logits, "total": cache + logits}


def distill_bytes(g: Geometry, *, dtype: str, batch_size: int, seq_len: int, ratio: float) -> dict[str, int]:
    """The distill stage ([distill], compensation/distill.py): the dense teacher at its dtype beside the
    pruned student in float32, AdamW state and gradients of the trained decoder-layer parameters (float32:
    gradient + two moments), the two models' logits of one batch (teacher at its dtype; student logits,
    both log-softmaxes and the gradient in float32) and the student's saved activations (float32, the
    unpruned layers' figure: an upper bound)."""
    e = _DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    p = g.parameters
    kept_blocks = round((p["attention"] + p["mlp"]) * (1.0 - ratio))
    trained = kept_blocks + p["norms"]
    teacher = p["total"] * e
    student = (p["total"] - (p["attention"] + p["mlp"] - kept_blocks)) * FP32
    optimizer = 3 * trained * FP32
    logits = tokens * g.vocab * (e + 4 * FP32)
    acts = activations(g, tokens, FP32, False)
    return {"trained_parameters": trained, "teacher": teacher, "student": student, "optimizer": optimizer,
            "logits": logits, "activations": acts, "total": teacher + student + optimizer + logits + acts}


@dataclass
class MethodPlan:
    """One method's figures (bytes), each at its real dtype."""

    method: str
    needs_gradients: bool
    needs_calibration: bool
    weights: int
    gradients: int
    buffers: dict[str, int]  # grad_sum, fisher, scratch, input_stats
    activations: dict[str, int]  # without / with gradient checkpointing (saved per batch, + loss head)
    peak: dict[str, int]  # without / with checkpointing: on the model's device (Fisher where hessian_device says)
    fisher_on_cpu: bool = False
    fits: dict[str, bool | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "needs_gradients": self.needs_gradients,
            "needs_calibration": self.needs_calibration, "weights": self.weights, "gradients": self.gradients,
            "buffers": dict(self.buffers), "activations": dict(self.activations), "peak": dict(self.peak),
            "fisher_on_cpu": self.fisher_on_cpu, "fits": dict(self.fits),
        }


def method_plan(g: Geometry, method: str, *, dtype: str, batch_size: int, seq_len: int,
                fisher_on_cpu: bool = False) -> MethodPlan:
    """The figures of one registered importance method (see the module docstring for the formulas)."""
    from prune_core.importance.registry import get_method

    spec = get_method(method)
    e = _DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    weights = g.parameters["total"] * e
    scratch = 2 * g.largest_scored * FP32
    if spec.needs_gradients:
        grads = g.scored * e
        fisher = g.scored * FP32 if spec.needs_fisher else 0
        buffers = {"grad_sum": g.scored * FP32, "fisher": fisher, "scratch": scratch,
                   "input_stats": input_stats(g, squares=False)}
        a = activation_per_layer(g, tokens, e)
        t = layer_backward(g, tokens, e)
        head = loss_head(g, tokens)
        plain, ckpt = activations(g, tokens, e, False), activations(g, tokens, e, True)
        on_device = weights + buffers["grad_sum"] + scratch + buffers["input_stats"] + (0 if fisher_on_cpu else fisher)
        acts = {"without_checkpointing": plain + max(head, t), "with_checkpointing": ckpt + max(head, a + t)}
        peak = {k: on_device + max(v, grads + a + t) for k, v in acts.items()}
    elif spec.needs_calibration:
        grads = 0
        buffers = {"grad_sum": 0, "fisher": 0, "scratch": tokens * g.intermediate * FP32,
                   "input_stats": input_stats(g, squares=True)}
        layer = tokens * (e * (2 * g.hidden + g.q + 2 * g.kv + 3 * g.intermediate) + FP32 * 2 * g.intermediate)
        forward = max(layer, tokens * g.vocab * (e + 2 * FP32))
        total = weights + buffers["scratch"] + buffers["input_stats"] + forward
        acts = {"without_checkpointing": forward, "with_checkpointing": forward}
        peak = {"without_checkpointing": total, "with_checkpointing": total}
    else:
        grads = 0
        buffers = {"grad_sum": 0, "fisher": 0, "scratch": scratch, "input_stats": 0}
        acts = {"without_checkpointing": 0, "with_checkpointing": 0}
        peak = {"without_checkpointing": weights + scratch, "with_checkpointing": weights + scratch}
    return MethodPlan(method=method, needs_gradients=spec.needs_gradients, needs_calibration=spec.needs_calibration,
                      weights=weights, gradients=grads, buffers=buffers, activations=acts, peak=peak,
                      fisher_on_cpu=fisher_on_cpu and spec.needs_fisher)


# --------------------------------------------------------------------------------------------------
# devices and what fits


def devices_present() -> list[dict[str, Any]]:
    """CUDA devices' free and total memory, else the system RAM (psutil, /proc/meminfo as fallback)."""
    found: list[dict[str, Any]] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            found.append({"device": f"cuda:{i}", "name": torch.cuda.get_device_name(i), "free": int(free),
                          "total": int(total)})
    found.append({"device": "cpu", "name": "system RAM", **_ram()})
    return found


def _ram() -> dict[str, int | None]:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return {"free": int(vm.available), "total": int(vm.total)}
    except Exception:  # psutil is a dependency; /proc/meminfo covers a broken install on Linux
        try:
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
            kib = {k: int(v.split()[0]) * 1024 for k, v in info.items() if k in ("MemAvailable", "MemTotal")}
            return {"free": kib.get("MemAvailable"), "total": kib.get("MemTotal")}
        except (OSError, ValueError, IndexError):
            return {"free": None, "total": None}


def _target(devices: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """The device the session's passes would run on, among those present (RAM when it has no GPU here)."""
    cuda = [d for d in devices if d["device"].startswith("cuda")]
    name = device.strip().lower()
    if name.startswith("cuda") and cuda:
        index = int(name.split(":")[1]) if ":" in name else 0
        return next((d for d in cuda if d["device"] == f"cuda:{index}"), cuda[0])
    if name == "auto" and cuda:
        return cuda[0]
    return devices[-1]


# --------------------------------------------------------------------------------------------------
# the plan


def build_plan(
    geometry: Geometry,
    *,
    model: str,
    source: str,
    dtype: str,
    seq_len: int,
    batch_size: int,
    num_samples: int,
    gradient_checkpointing: bool,
    hessian_device: str,
    device: str,
    method: str,
    ratio: float,
    compensate: str,
    devices: list[dict[str, Any]] | None = None,
    distill_steps: int = 0,
    distill_batch_size: int = 4,
    generated_samples: int = 0,
    error_feedback: float = 0.0,
    blocks: str = "both",
    save_model: bool = True,
    results_dir: Path | None = None,
) -> dict[str, Any]:
    """One plan object (JSON-ready): model, settings, per-method figures, reconstruction, devices, advice."""
    from prune_core.importance.registry import method_keys

    if dtype not in _DTYPE_BYTES:
        raise BadInput(f"unknown dtype {dtype!r}", f"use one of: {', '.join(_DTYPE_BYTES)}")
    if seq_len < 2 or batch_size < 1:
        raise BadInput(f"seq_len must be >= 2 and batch_size >= 1 (got {seq_len}, {batch_size})",
                       "pass --seq-len 2 or more and --batch-size 1 or more")
    devices = devices_present() if devices is None else devices
    target = _target(devices, device)
    ram = devices[-1]
    checkpointing = "with_checkpointing" if gradient_checkpointing else "without_checkpointing"
    methods: list[MethodPlan] = []
    for key in method_keys():
        plan = method_plan(geometry, key, dtype=dtype, batch_size=batch_size, seq_len=seq_len)
        fisher = plan.buffers["fisher"]
        # the engine decides with the model already loaded: free then = free now − the weights
        on_cpu = fisher > 0 and (hessian_device == "cpu" or target["device"] == "cpu" or (
            hessian_device == "auto" and target["free"] is not None
            and target["free"] - plan.weights < FISHER_FREE_FACTOR * fisher + FISHER_FREE_MARGIN))
        if on_cpu and target["device"] != "cpu":
            plan = method_plan(geometry, key, dtype=dtype, batch_size=batch_size, seq_len=seq_len, fisher_on_cpu=True)
        free = target["free"]
        plan.fits = {k: (None if free is None else v <= free) for k, v in plan.peak.items()}
        if plan.fisher_on_cpu and ram["free"] is not None:
            plan.fits["fisher_in_ram"] = fisher <= ram["free"]
        methods.append(plan)
    chosen = next(m for m in methods if m.method == method)
    gram = gram_bytes(geometry, ratio)
    streams = stream_bytes(geometry, dtype=dtype, windows=num_samples + generated_samples, seq_len=seq_len,
                           error_feedback=error_feedback)
    recorded = recorded_stream_bytes(geometry, dtype=dtype, windows=num_samples + generated_samples,
                                     seq_len=seq_len, blocks=blocks) \
        if compensate == "reconstruct" and error_feedback > 0 and target["device"] == "cpu" else 0
    recon_total = gram["total"] + streams["total"] + recorded
    plan_obj: dict[str, Any] = {
        "kind": "memory_plan",
        "model": {"spec": model, "source": source, "model_type": geometry.model_type, "hidden_size": geometry.hidden,
                  "num_layers": geometry.layers, "num_heads": geometry.heads, "num_kv_heads": geometry.kv_heads,
                  "head_dim": geometry.head_dim, "intermediate_size": geometry.intermediate,
                  "vocab_size": geometry.vocab, "tied_embeddings": geometry.tied,
                  "parameters": dict(geometry.parameters), "scored_parameters": geometry.scored,
                  "largest_scored_tensor": geometry.largest_scored},
        "settings": {"dtype": dtype, "bytes_per_element": _DTYPE_BYTES[dtype], "seq_len": seq_len,
                     "batch_size": batch_size, "tokens_per_batch": seq_len * batch_size, "num_samples": num_samples,
                     "gradient_checkpointing": gradient_checkpointing, "hessian_device": hessian_device,
                     "device": device, "method": method, "ratio": ratio, "compensate": compensate},
        "methods": [m.to_dict() for m in methods],
        "reconstruct": {"gram": gram, "activations": streams, "error_feedback": error_feedback,
                        "recorded_stream": recorded, "total": recon_total, "used": compensate == "reconstruct",
                        "fits": None if ram["free"] is None and target["free"] is None
                        else recon_total <= (target["free"] or 0)},
        "generation": {**generation_bytes(geometry, dtype=dtype, seq_len=seq_len,
                                          batch_size=min(GENERATION_BATCH, max(generated_samples, 1))),
                       "used": generated_samples > 0, "windows": generated_samples},
        "distill": {**distill_bytes(geometry, dtype=dtype, batch_size=distill_batch_size, seq_len=seq_len,
                                    ratio=ratio),
                    "used": distill_steps > 0, "batch_size": distill_batch_size},
        "disk": {**disk_bytes(geometry.parameters, chosen.buffers, element_bytes=_DTYPE_BYTES[dtype], ratio=ratio,
                              save_model=save_model, distill_steps=distill_steps),
                 "folder": None if results_dir is None else str(results_dir),
                 "free": None if results_dir is None else free_bytes(results_dir)},
        "devices": devices,
        "target": target["device"],
        "assumptions": ASSUMPTIONS,
    }
    plan_obj["suggestions"] = suggestions(geometry, chosen, target, ram, dtype=dtype, seq_len=seq_len,
                                          batch_size=batch_size, checkpointing=checkpointing,
                                          hessian_device=hessian_device)
    return plan_obj


ASSUMPTIONS = (
    "activations: eager LLaMA-style decoder layers with sdpa (flash / memory-efficient kernel, no padding mask), "
    "only the scored parameters require gradients; other families are approximate",
    "peak of a gradient pass = a batch after the first (Σg exists beside the fresh gradients)",
    "loss head: float32 log-softmax over the vocabulary plus two T×V float32 gradients in its backward",
    "not counted: the framework itself (CUDA context ~0.5 GiB, the Python process ~0.5 GiB), allocator "
    "fragmentation, the tokenizer and calibration data",
)


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "unknown"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / MIB:.1f} MiB"


def suggestions(g: Geometry, chosen: MethodPlan, target: dict[str, Any], ram: dict[str, Any], *, dtype: str,
                seq_len: int, batch_size: int, checkpointing: str, hessian_device: str) -> list[str]:
    """What to change when the chosen method does not fit on the target device (empty when it fits)."""
    free = target["free"]
    need = chosen.peak[checkpointing]
    if free is None or need <= free:
        return []
    where = target["device"]
    out: list[str] = [f"{chosen.method} needs about {fmt_bytes(need)} on {where} but {fmt_bytes(free)} is free"]

    def peak(**changes: Any) -> int:
        kw: dict[str, Any] = {"dtype": dtype, "batch_size": batch_size, "seq_len": seq_len,
                              "fisher_on_cpu": chosen.fisher_on_cpu}
        ck = changes.pop("checkpointing", checkpointing)
        kw.update(changes)
        return method_plan(g, chosen.method, **kw).peak[ck]

    if dtype == "float32":
        out.append(f'dtype = "bfloat16": weights and gradients in bf16, the sums stay float32 → {fmt_bytes(peak(dtype="bfloat16"))}')
    if chosen.buffers["fisher"] and not chosen.fisher_on_cpu and where != "cpu":
        ok = ram["free"] is None or chosen.buffers["fisher"] <= ram["free"]
        out.append(f'hessian_device = "cpu": the Fisher buffer ({fmt_bytes(chosen.buffers["fisher"])}) in system RAM'
                   f' → {fmt_bytes(peak(fisher_on_cpu=True))} on {where}' + ("" if ok else " (RAM is short for it too)"))
    if chosen.needs_gradients and checkpointing == "without_checkpointing":
        out.append(f"gradient_checkpointing = true → {fmt_bytes(peak(checkpointing='with_checkpointing'))}")
    for s in (seq_len // 2, seq_len // 4):
        if s >= 2 and s != seq_len:
            out.append(f"seq_len = {s} → {fmt_bytes(peak(seq_len=s))}")
            break
    if batch_size > 1:
        out.append(f"batch_size = 1 → {fmt_bytes(peak(batch_size=1))}")
    floor = method_plan(g, chosen.method, dtype="bfloat16" if dtype == "float32" else dtype, batch_size=1,
                        seq_len=min(seq_len, 128), fisher_on_cpu=chosen.needs_gradients and where != "cpu"
                        ).peak["with_checkpointing"]
    out.append(f"all of these (bf16, Fisher on CPU, checkpointing, batch 1, seq_len ≤ 128) → {fmt_bytes(floor)}")
    out.append("more ranks: data-parallel ranks (torchrun) split the batches, so each rank's activations shrink "
               "with its share of the batch; each rank still holds the weights and the buffers above")
    if floor > free:
        out.append("it does not fit even so: the weights and buffers alone are too large for this device; use a "
                   "larger device, or run on the CPU with enough RAM (slow but it works)")
    return out


def plan_for_session(session: Any, *, model: str | None = None, seq_len: int | None = None,
                     batch_size: int | None = None, devices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Read the model's config named by the session (or `model`) and build the plan for its settings."""
    spec = model if model is not None else session.model.id
    config, source = load_config(spec, revision=session.model.revision if model is None else "")
    return build_plan(
        geometry_from_config(config), model=spec, source=source, dtype=session.model.dtype,
        seq_len=seq_len if seq_len is not None else session.data.seq_len,
        batch_size=batch_size if batch_size is not None else session.data.batch_size,
        num_samples=session.data.num_samples, gradient_checkpointing=session.importance.gradient_checkpointing,
        hessian_device=session.importance.hessian_device, device=session.model.device,
        method=session.importance.method, ratio=session.pruning.ratio, compensate=session.pruning.compensate,
        devices=devices, distill_steps=session.distill.steps, distill_batch_size=session.distill.batch_size,
        generated_samples=session.data.generated_samples, error_feedback=session.pruning.error_feedback,
        blocks=session.pruning.budget()[0], save_model=session.output.save_model,
        results_dir=Path(session.session.output_dir).expanduser() / session.session.name,
    )


__all__ = [
    "Geometry",
    "MethodPlan",
    "activation_per_layer",
    "activations",
    "build_plan",
    "devices_present",
    "distill_bytes",
    "fmt_bytes",
    "generation_bytes",
    "geometry_from_config",
    "layer_backward",
    "load_config",
    "loss_head",
    "method_plan",
    "plan_for_session",
    "stream_bytes",
]
