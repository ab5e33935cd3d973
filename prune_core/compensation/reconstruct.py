"""Prune layer by layer and refit each pruned block's output projection by ridge least squares.

Why: removing attention KV groups or MLP channels deletes input columns of o_proj / down_proj; the
block's output then misses W[:, removed] · x_removed. Plain removal ignores that; FLAP-style bias
compensation replaces x_removed by its calibration mean. Here the kept columns themselves are refit so
that the pruned projection reproduces, on calibration activations, what the *original* projection
produced from the same input - the error each block makes is corrected before it reaches later layers.

What, for decoder layer l in order (the calibration hidden states of all `N` windows are kept in
memory as the stream; they flow through the already pruned and refit layers 0..l-1, in batches of
`batch_size` windows; only the layers from the first pruned one to the last pruned one run, since
before it the stream is the dense model's and after it no refit reads it; the closed form and the
sums it reads are in ridge.py):

1. attention: with the stream as input, run layer l up to its (unpruned) o_proj and accumulate the
   Gram C = X̃ᵀX̃ of o_proj's input X (all heads) augmented with a constant-1 column X̃ = [X, 1];
   prune the layer's attention with `prune_core.surgery.apply_pruning` and set the new o_proj to
   the ridge solution (K = kept input columns; a kept KV group k keeps its r query heads, columns
   [k·r·d, (k+1)·r·d); the kept heads' inputs are exactly those columns of X, since q/k/v of kept
   heads are unchanged):

       W′ = (W̃ C̃[:, K′] + λ W̃[:, K′]) (C̃[K′, K′] + λ I)⁻¹,   λ = ridge × mean(diag C[K, K])

   with W̃ = [W, b] the original weight and bias (b = 0 when o_proj has none) and K′ = K plus the
   bias column. The ridge term pulls W′ toward the original W_K: it keeps the fit from overfitting
   the calibration text (an unregularized refit of down_proj measurably worsens perplexity on
   other domains; a shrunk one improves both). `bias` says what happens to the bias column:
   "shrink" (default) shrinks it toward the original bias with the same λ, so ridge → ∞ is exactly
   plain removal; "fit" leaves it unshrunk (ridge → ∞ is then FLAP-style mean compensation);
   "none" fits no bias (the original bias, if any, is kept). A bias created where the projection
   had none adds `hidden_size` parameters (`SurgeryReport.added_bias_parameters`). Measured on
   smollm2-135m at 20 % (BENCHMARKS.md): "shrink" and "fit" agree within 0.1 % perplexity on both
   domains; "shrink" is the default because its ridge → ∞ limit is plain removal. Ridge 1 is the
   best other-domain setting (0.3: slightly better in-domain, worse other-domain; 3, 10: worse).
2. MLP: with the stream through the pruned attention, run the layer and accumulate the Gram of
   down_proj's input act(gate)·up of all channels; prune the MLP channels and refit down_proj the
   same way.
3. the layer's output through the pruned attention and MLP becomes the next layer's input.

Error feedback (`error_feedback` = α, 0–1; 0 is the above): the targets above make each block
reproduce its own original output on the pruned stream, so the error earlier layers left in the
stream is carried on. With α > 0 each refit's target gains α × (dense stream − pruned stream) at the
point where the block adds its output: after the attention for o_proj, after the layer for down_proj
(the error left once the attention was refit). Equivalently the target is (1 − α) × the original
block's output + α × Y, with Y = (dense stream there) − (pruned stream before the block), what the
block would have to add to bring the stream back to the dense one. The pass accumulates Σ X̃_K′ᵀ Y
(`CrossSums`), which needs no output of the original projection, and turns it into the cross term
Σ X̃_K′ᵀ E of the closed form (`ridge_refit(cross=...)`) with the Gram: Σ X̃_K′ᵀ(X̃ W̃ᵀ) = (W̃ C̃[:, K′])ᵀ.
The dense stream comes from the importance pass when it recorded one on the same tokens and batches
(`dense_stream`, prune_core/dense_stream.py: that pass ran the dense model over exactly these
batches); otherwise the unpruned layer l runs on the dense stream first (one more forward of each
layer from the first pruned one on; before it both streams are the same). Families that normalise
block outputs before the residual add (Gemma 2/3) get α = 0 and a notice. Measured on smollm2-135m
(BENCHMARKS.md): α = 0.5 lowers held-out perplexity on both domains, most at 40 %.

Cost: about one forward of the decoder layers over the calibration windows (without down_proj in
the pruned layers) plus the Gram products (each batch's product in float32 by `addmm_` into a
float32 buffer, added to the `gram_dtype` sum every `FLUSH_ROWS` tokens; `ProductSum`). Both passes over a
pruned layer stop at the refit projection's input. When the activations fit in `STORE_LIMIT_BYTES`,
step 1 keeps o_proj's inputs, so step 2 replays the refit attention output instead of recomputing
attention (the attention module's forward is swapped for a replay during that layer's passes), and
step 3 needs no third pass: the layer's output is the stream after its attention + W′ x_K + b′ (the
kept down_proj inputs are kept). Otherwise — and always in families with sandwich norms, whose layer
output is not that sum — the pruned layer runs again. With a recorded dense stream the layers before
the first pruned one do not run at all (the stream there is the recorded one). Measured on
smollm2-135m, 20 % of the MLP channels, 32 windows (BENCHMARKS.md, "Importance pass"): about half the
time of the importance pass over the same windows with error feedback, less without.

Under torchrun (`prune_core/distributed.py`, every rank calls this with the same groups): each rank
keeps the stream of its own share of the batches (batch b: rank b % world, as in the importance pass)
and, for every refit, the Gram sums (`GramSums`: X̃ᵀX̃ columns, Σ X, count) and the error-feedback cross
sums (`CrossSums`) are all-reduced before each rank solves the same ridge system, so all ranks hold the
same weights, equal (to float summation order) to a single-process run over the same windows; the
constants of zero blocks come from the same sums. A stop asked on any rank stops them all (checked
before each layer). In a single process nothing of this runs.

A block pruned to 100 % becomes `ZeroAttention` / `ZeroMLP` (by `apply_pruning`, once all layers
are done, since it refuses to prune a model that already has zero blocks). Its only parameter is
a constant output bias: unless `bias="none"` it is set to the mean of the original block's output
on the calibration stream (the least-squares constant).

Rotary embeddings, attention masks (causal, sliding windows) and every other argument come from the
model itself: one forward of the unpruned model records, per batch, the input of layer 0 and the
arguments each decoder layer is called with (the layers' `forward` is replaced by a recorder for
that pass), and later each layer is called with its own recorded arguments. Nothing of attention is
re-implemented. λ = ∞ (ridge=math.inf) is plain removal; ridge = 0 is the unregularized least
squares (a Cholesky solve, with a minimum-norm `lstsq` fallback when C[K, K] is singular).

    from prune_core.compensation import prune_and_reconstruct
    report = prune_and_reconstruct(model, adapter, alloc.pruned_indices(), calib_tokens, ridge=1.0)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prune_core import distributed
from prune_core.compensation.ridge import BIAS_MODES, DEFAULT_BIAS, CrossSums, GramSums, ridge_refit
from prune_core.dense_stream import DenseStream
from prune_core.errors import BadInput, Interrupted
from prune_core.events import EventSink, Notice, Progress
from prune_core.surgery import SurgeryReport, ZeroAttention, ZeroMLP, apply_pruning, count_parameters

# Keep the down_proj inputs of all calibration tokens (to skip a third forward per layer) below this.
STORE_LIMIT_BYTES = 1 << 30

__all__ = ["BIAS_MODES", "DEFAULT_BIAS", "prune_and_reconstruct", "ridge_refit"]


class _Stop(Exception):
    """Raised inside a hook to end a forward pass early (caught by this module only)."""


# ---------------------------------------------------------------------------------------------
# Activation capture
# ---------------------------------------------------------------------------------------------

def _record_layer_calls(model: nn.Module, layers: nn.ModuleList, tokens: torch.Tensor, batch_size: int,
                        world: distributed.World | None = None
                        ) -> tuple[list[torch.Tensor], list[list[tuple[tuple[Any, ...], dict[str, Any]]]]]:
    """One forward of the model per batch with each layer's forward replaced by a recorder: returns the
    layer-0 inputs per batch and, per batch and layer, the other arguments the layer was called with.
    With an active `world`, only the batches this rank owns."""
    w = world or distributed.World()
    num_layers = len(layers)
    stream: list[torch.Tensor] = []
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = []
    current: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def recorder(idx: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest = kwargs.pop("hidden_states"), ()
            if idx == 0:
                stream.append(hidden.detach().clone())
            current.append((rest, dict(kwargs)))
            if idx == num_layers - 1:
                raise _Stop
            return hidden
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)  # an instance attribute: nn.Module.__call__ (and hooks) use it
    try:
        for i, start in enumerate(range(0, tokens.shape[0], batch_size)):
            if w.active and not w.owns(i):
                continue
            current = []
            with contextlib.suppress(_Stop):
                model(input_ids=tokens[start:start + batch_size], use_cache=False)
            if len(current) != num_layers:
                raise BadInput(f"the model called {len(current)} of its {num_layers} decoder layers",
                               "use a LLaMA-family model whose forward runs every decoder layer in order")
            calls.append(current)
    finally:
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
    return stream, calls


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple[Any, ...], dict[str, Any]]) -> torch.Tensor | None:
    """Call a decoder layer with its recorded arguments; None when a hook stopped it early."""
    args, kwargs = call
    try:
        out = layer(hidden, *args, **kwargs)
    except _Stop:
        return None
    return out[0] if isinstance(out, tuple) else out


def _capture_input(module: nn.Module, sink: Callable[[torch.Tensor], None], stop: bool) -> Any:
    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        sink(args[0])
        if stop:
            raise _Stop
    return module.register_forward_pre_hook(hook)


def _constant_output(block: nn.Module, value: torch.Tensor | None, is_attention: bool) -> Any:
    """Make a block output a constant (its stand-in until the final surgery replaces it)."""
    def hook(_mod: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        main = output[0] if isinstance(output, tuple) else output
        new = torch.zeros_like(main)
        if value is not None:
            new = new + value.to(new.dtype)
        if is_attention and isinstance(output, tuple):
            return (new, *output[1:])
        return new
    return block.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_inputs(model: nn.Module, adapter: Any, pruned: Mapping[Any, Mapping[str, Sequence[int]]],
                  tokens: Any, ridge: float, batch_size: int, gram_dtype: Any, bias: str, feedback: Any
                  ) -> dict[int, tuple[list[int], list[int]]]:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype.is_floating_point \
            or tokens.dtype == torch.bool or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise BadInput("calibration tokens must be an integer tensor [num_samples, seq_len] with at least one row",
                       "pass prune_core.data.calibration_tokens(...)")
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if vocab is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise BadInput(f"calibration token ids must lie in 0..{vocab - 1}", "tokenize with this model's tokenizer")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BadInput(f"batch_size must be a positive integer (got {batch_size!r})", "use batch_size = 1 or more")
    if isinstance(ridge, bool) or not isinstance(ridge, int | float) or not (ridge >= 0):
        raise BadInput(f"ridge must be a number >= 0 (got {ridge!r})",
                       "use ridge = 0 (least squares), 1 (default) or more (closer to plain removal)")
    if not isinstance(gram_dtype, torch.dtype) or not gram_dtype.is_floating_point:
        raise BadInput(f"gram_dtype must be a floating torch dtype (got {gram_dtype!r})", "use torch.float64")
    if bias not in BIAS_MODES:
        raise BadInput(f"unknown bias mode {bias!r}", f"use one of: {', '.join(BIAS_MODES)}")
    if isinstance(feedback, bool) or not isinstance(feedback, int | float) or not (0.0 <= feedback <= 1.0):
        raise BadInput(f"error_feedback must be a number from 0 to 1 (got {feedback!r})",
                       "use 0 (each block reproduces its own output), 1 (aim at the dense stream) or between")
    num_layers = adapter.num_layers(model)
    out: dict[int, tuple[list[int], list[int]]] = {}
    for key, spec in pruned.items():
        try:
            li = int(key)
        except (TypeError, ValueError):
            raise BadInput(f"pruned layer key {key!r} is not a layer index", "use integer layer indices") from None
        if not 0 <= li < num_layers:
            raise BadInput(f"pruned layer {li} does not exist (the model has {num_layers})",
                           "prune indices computed for this model")
        unknown = set(spec) - {"attention", "mlp"}
        if unknown:
            raise BadInput(f"layer {li}: unknown block(s) {sorted(unknown)}", "use the keys 'attention' and 'mlp'")
        parts = adapter.parts(model, li)
        lists = []
        for what, n in (("attention", parts.num_kv_heads), ("mlp", parts.intermediate_size)):
            idx = sorted({int(v) for v in spec.get(what, ())})
            if idx and (idx[0] < 0 or idx[-1] >= n):
                raise BadInput(f"layer {li}: {what} index out of range 0..{n - 1}",
                               "prune indices computed for this model")
            lists.append(idx)
        out[li] = (lists[0], lists[1])
    for li, layer in enumerate(adapter.layers(model)):
        for name in (adapter.attn_name, adapter.mlp_name):
            if isinstance(getattr(layer, name), ZeroAttention | ZeroMLP):
                raise BadInput(f"layer {li} already had its {name} removed by an earlier pruning",
                               "prune the original model instead of an already pruned one")
    return out


# ---------------------------------------------------------------------------------------------
# The layer-wise loop
# ---------------------------------------------------------------------------------------------

def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Write a refit weight / bias into a Linear; returns the bias parameters created."""
    ref = linear.weight
    linear.weight = nn.Parameter(weight.to(device=ref.device, dtype=ref.dtype).contiguous(),
                                 requires_grad=ref.requires_grad)
    added = 0
    if bias is None:
        linear.register_parameter("bias", None)
    else:
        added = 0 if linear.bias is not None else int(bias.numel())
        linear.bias = nn.Parameter(bias.to(device=ref.device, dtype=ref.dtype).contiguous(),
                                   requires_grad=ref.requires_grad)
    return added


def prune_and_reconstruct(model: nn.Module, adapter: Any, pruned: Mapping[int, Mapping[str, Sequence[int]]],
                          tokens: torch.LongTensor, *, ridge: float = 1.0, batch_size: int = 4,
                          gram_dtype: torch.dtype = torch.float64, on_event: EventSink | None = None,
                          should_stop: Callable[[], bool] | None = None, stage: str = "surgery",
                          bias: str = DEFAULT_BIAS, error_feedback: float = 0.0,
                          dense_stream: DenseStream | None = None) -> SurgeryReport:
    """Prune `pruned[layer]["attention"/"mlp"]` in place, refitting o_proj / down_proj layer by layer.

    See the module docstring. Returns one `SurgeryReport` for the whole model: `compensated` lists
    the refit projections (and zero blocks given a constant bias), `added_bias_parameters` the
    biases created where a projection had none. `error_feedback` (0–1) is the share of the stream's
    error (pruned stream − dense stream, left by earlier layers) each refit also corrects; families
    whose block outputs are normalised before the residual add get 0, with a notice.

    `dense_stream`: the dense model's per-layer outputs recorded by the importance pass on the same tokens
    and batches (prune_core/dense_stream.py); with error feedback it replaces running each layer on the
    dense stream. One that does not match the tokens and batch size is ignored.

    Under torchrun every rank calls it with the same `pruned` and `tokens`: each reads its share of
    the batches and the sums are all-reduced (module docstring); only rank 0 reports events.
    """
    spec = _check_inputs(model, adapter, pruned, tokens, ridge, batch_size, gram_dtype, bias, error_feedback)
    feedback = float(error_feedback)
    world = distributed.world()
    if not world.is_main:  # rank 0 reports for all ranks
        on_event = None
    if feedback > 0 and not getattr(adapter, "residual_outputs", True):
        if on_event is not None:
            on_event(Notice(message=f"error_feedback = {feedback:g} is not applied: this family normalises its "
                            "block outputs before adding them to the residual stream, so a stream error does "
                            "not map onto o_proj / down_proj; each block reproduces its own output instead",
                            level="warning", stage=stage))
        feedback = 0.0
    layers = adapter.layers(model)
    num_layers = len(layers)
    device = next(model.parameters()).device
    tokens = tokens.to(device=device, dtype=torch.long)
    params_before = count_parameters(model)
    sizes = {li: (adapter.parts(model, li).num_kv_heads, adapter.parts(model, li).intermediate_size)
             for li in range(num_layers)}
    compensated: list[str] = []
    added = 0
    pruned_params = 0
    full_removal: dict[int, dict[str, list[int]]] = {}
    zero_bias: dict[tuple[int, str], torch.Tensor] = {}
    hooks: list[Any] = []
    # the layer's output is the stream after its attention + the MLP's output (not so with sandwich norms)
    residual = bool(getattr(adapter, "residual_outputs", True))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            stream, calls = _record_layer_calls(model, layers, tokens, batch_size, world)
            owned = [i for i in range(math.ceil(tokens.shape[0] / batch_size)) if not world.active or world.owns(i)]
            recorded = dense_stream if feedback > 0 and dense_stream is not None \
                and dense_stream.matches(tokens, batch_size, owned) else None
            if world.active and feedback > 0:  # every rank takes the same path (the layers they run differ)
                (missing,) = world.any_of(recorded is None)
                recorded = None if missing else recorded
            # error feedback without a recorded stream: the dense model's stream, advanced by each layer
            # before it is pruned; it is the pruned stream itself until the first pruned layer
            dense: list[torch.Tensor] | None = None
            # Only the layers from the first pruned one to the last pruned one run: before it the pruned
            # stream is the dense one (taken from a recorded stream when there is one), after it the
            # stream feeds no refit. The recorded tensors are never changed in place (new tensors only).
            pruned_layers = [li for li, (a, m) in spec.items() if a or m]
            first, last = min(pruned_layers, default=num_layers), max(pruned_layers, default=-1)
            start = 0
            if recorded is not None and 0 < first < num_layers:
                stream, start = recorded.output(first - 1, owned, device), first
            for li in range(start, last + 1):
                stop = should_stop is not None and bool(should_stop())
                if world.active:  # asked on any rank, it stops them all
                    (stop,) = world.any_of(stop)
                if stop:
                    raise Interrupted(f"reconstruction stopped before layer {li} of {num_layers}; the model is "
                                      "partially pruned", "reload the model and run the surgery again")
                layer = layers[li]
                attn_module = getattr(layer, adapter.attn_name)
                att_rm, mlp_rm = spec.get(li, ([], []))
                prefix = f"{adapter.layers_path}.{li}"
                dense_mid: list[torch.Tensor] = []  # dense stream after this layer's attention
                dense_next: list[torch.Tensor] = []  # dense stream after this layer
                if feedback > 0 and recorded is not None:
                    if att_rm or mlp_rm:
                        dense_mid, dense_next = _recorded_layer(recorded, li, bool(att_rm), owned, device, layer,
                                                                attn_module, stream, calls)
                elif feedback > 0:
                    if dense is None and (att_rm or mlp_rm):
                        dense = [h.clone() for h in stream]
                    if dense is not None:
                        dense_mid, dense_next = _dense_layer(layer, attn_module, dense, calls, li)
                batch_at = [0]

                # ---- attention ----
                n_tokens = sum(h.shape[0] * h.shape[1] for h in stream)
                att_out: list[torch.Tensor] | None = None  # the refit attention's output per batch, if kept
                if att_rm:
                    parts = adapter.parts(model, li)
                    o = parts.o_proj
                    r, d = parts.group_size, parts.head_dim
                    kept_heads = _kept(parts.num_kv_heads, att_rm)
                    cols = [k * r * d + i for k in kept_heads for i in range(r * d)]
                    gram = GramSums(o.in_features, gram_dtype, device, cols)
                    cross = CrossSums(cols if kept_heads else [], bias != "none", o.out_features, gram_dtype, device) \
                        if feedback > 0 else None
                    store_att = n_tokens * o.in_features * o.weight.element_size() <= STORE_LIMIT_BYTES
                    att_in: list[torch.Tensor] = []

                    def sink_att(x: torch.Tensor, gram: GramSums = gram, att_in: list[torch.Tensor] = att_in,
                                 store: bool = store_att, cross: CrossSums | None = cross,
                                 at: list[int] = batch_at, mid: list[torch.Tensor] = dense_mid,
                                 inputs: list[torch.Tensor] = stream) -> None:
                        xk = gram.add(x)
                        if store:
                            att_in.append(x.detach())
                        if cross is not None:  # what the attention should add to reach the dense stream
                            cross.add(xk, mid[at[0]] - inputs[at[0]])

                    handle = _capture_input(o, sink_att, stop=True)
                    try:
                        for b, h in enumerate(stream):
                            batch_at[0] = b
                            _run_layer(layer, h, calls[b][li])
                    finally:
                        handle.remove()
                    gram.all_reduce(world)
                    w0 = o.weight.detach().clone()
                    b0 = None if o.bias is None else o.bias.detach().clone()
                    gp = gram.parts()
                    if cross is not None:
                        cross.all_reduce(world)
                        cross.to_error(w0, b0, gp)
                    const: torch.Tensor | None = None
                    if kept_heads:
                        rep = apply_pruning(model, adapter, {li: {"attention": att_rm}})
                        pruned_params += rep.pruned_parameters
                        new_w, new_b = ridge_refit(w0, b0, gp, cols, ridge=float(ridge),
                                                   bias_mode=bias, cross=_scaled(cross, feedback))
                        new_o = adapter.parts(model, li).o_proj
                        added += _set_linear(new_o, new_w, new_b)
                        compensated.append(f"{prefix}.{adapter.attn_name}.o_proj")
                        if store_att:
                            cols_t = torch.tensor(cols, dtype=torch.long, device=device)
                            att_out = [new_o(x.index_select(-1, cols_t)) for x in att_in]
                    else:
                        full_removal.setdefault(li, {})["attention"] = att_rm
                        const = _block_constant(w0, b0, gram, bias, cross, feedback)
                        if const is not None:
                            zero_bias[(li, "attention")] = const
                        hooks.append(_constant_output(attn_module, const, True))
                        if store_att:
                            att_out = [_constant_like(x, w0.shape[0], const) for x in att_in]
                    att_in.clear()
                    del gp
                # The layer's later runs take the refit attention's output from memory (no second
                # attention pass): its forward is replaced for this layer's remaining passes.
                batch_at[0] = 0
                if att_out is not None:
                    attn_module.forward = _replay(att_out, batch_at)

                # ---- MLP, and the layer's output ----
                try:
                    if mlp_rm:
                        parts = adapter.parts(model, li)
                        down = parts.down_proj
                        kept_ch = _kept(parts.intermediate_size, mlp_rm)
                        gram = GramSums(down.in_features, gram_dtype, device, kept_ch)
                        cross = CrossSums(kept_ch, bias != "none", down.out_features, gram_dtype, device) \
                            if feedback > 0 else None
                        # the pass stops at down_proj's input; the stream after the attention plus the refit
                        # MLP's output is the layer's output (residual families, when it all fits in memory)
                        store = residual and n_tokens * (down.in_features + down.out_features) \
                            * down.weight.element_size() <= STORE_LIMIT_BYTES
                        inputs: list[torch.Tensor] = []
                        mids: list[torch.Tensor] = []

                        def keep_mid(_m: nn.Module, _a: tuple[Any, ...], out: Any, mids: list[torch.Tensor] = mids,
                                     at: list[int] = batch_at, before: list[torch.Tensor] = stream,
                                     store: bool = store) -> None:
                            mid = before[at[0]] + (out[0] if isinstance(out, tuple) else out)
                            mids[:] = [*(mids if store else []), mid]

                        def sink(x: torch.Tensor, gram: GramSums = gram, inputs: list[torch.Tensor] = inputs,
                                 store: bool = store, cross: CrossSums | None = cross, at: list[int] = batch_at,
                                 nxt: list[torch.Tensor] = dense_next, mids: list[torch.Tensor] = mids) -> None:
                            xk = gram.add(x)
                            if store:  # the kept channels only: all the refit down_proj reads
                                inputs.append(xk.to(x.dtype).reshape(*x.shape[:-1], xk.shape[-1]))
                            if cross is not None:  # what the MLP should add to reach the dense stream
                                cross.add(xk, nxt[at[0]] - mids[-1])

                        handle = _capture_input(down, sink, stop=True)
                        mid_handle = attn_module.register_forward_hook(keep_mid) if residual else None
                        try:
                            for b, h in enumerate(stream):
                                batch_at[0] = b
                                _run_layer(layer, h, calls[b][li])
                        finally:
                            handle.remove()
                            if mid_handle is not None:
                                mid_handle.remove()
                        gram.all_reduce(world)
                        w0 = down.weight.detach().clone()
                        b0 = None if down.bias is None else down.bias.detach().clone()
                        gp = gram.parts()
                        if cross is not None:
                            cross.all_reduce(world)
                            cross.to_error(w0, b0, gp)
                        if kept_ch:
                            rep = apply_pruning(model, adapter, {li: {"mlp": mlp_rm}})
                            pruned_params += rep.pruned_parameters
                            new_w, new_b = ridge_refit(w0, b0, gp, kept_ch, ridge=float(ridge),
                                                       bias_mode=bias, cross=_scaled(cross, feedback))
                            new_down = adapter.parts(model, li).down_proj
                            added += _set_linear(new_down, new_w, new_b)
                            compensated.append(f"{prefix}.{adapter.mlp_name}.down_proj")
                        else:
                            full_removal.setdefault(li, {})["mlp"] = mlp_rm
                            const = _block_constant(w0, b0, gram, bias, cross, feedback)
                            if const is not None:
                                zero_bias[(li, "mlp")] = const
                            hooks.append(_constant_output(getattr(layer, adapter.mlp_name), const, False))
                        del gp
                        if store:  # output = stream after the attention + refit MLP output
                            for b, (xk, mid) in enumerate(zip(inputs, mids, strict=True)):
                                new = new_down(xk) if kept_ch \
                                    else _constant_like(xk, w0.shape[0], zero_bias.get((li, "mlp")))
                                stream[b] = mid + new
                            inputs.clear()
                            mids.clear()
                        else:
                            inputs.clear()
                            mids.clear()
                            for b, h in enumerate(stream):
                                batch_at[0] = b
                                out = _run_layer(layer, h, calls[b][li])
                                assert out is not None
                                stream[b] = out
                    else:
                        for b, h in enumerate(stream):
                            batch_at[0] = b
                            out = _run_layer(layer, h, calls[b][li])
                            assert out is not None
                            stream[b] = out
                finally:
                    if "forward" in attn_module.__dict__:
                        del attn_module.forward
                if dense is not None:
                    dense = dense_next
                if on_event is not None:
                    on_event(Progress(stage=stage, done=li + 1, total=num_layers, unit="layers"))
            if on_event is not None and last + 1 < num_layers:
                on_event(Progress(stage=stage, done=num_layers, total=num_layers, unit="layers"))
    finally:
        for handle in hooks:
            handle.remove()
        if was_training:
            model.train()

    removed_att: list[int] = []
    removed_mlp: list[int] = []
    if full_removal:
        rep = apply_pruning(model, adapter, full_removal)
        pruned_params += rep.pruned_parameters
        removed_att, removed_mlp = rep.removed_attention_blocks, rep.removed_mlp_blocks
        with torch.no_grad():
            for (li, what), const in sorted(zero_bias.items()):
                name = adapter.attn_name if what == "attention" else adapter.mlp_name
                module = getattr(layers[li], name)
                ref = next(layers[li].parameters())
                added += int(const.numel())
                module.bias = nn.Parameter(const.to(device=ref.device, dtype=ref.dtype).clone(),
                                           requires_grad=ref.requires_grad)
                compensated.append(f"{adapter.layers_path}.{li}.{name}")
    kept = {li: {"attention": _kept(n_att, spec.get(li, ([], []))[0]), "mlp": _kept(n_mlp, spec.get(li, ([], []))[1])}
            for li, (n_att, n_mlp) in sizes.items()}
    return SurgeryReport(params_before=params_before, params_after=count_parameters(model), kept=kept,
                         removed_attention_blocks=removed_att, removed_mlp_blocks=removed_mlp,
                         pruned_parameters=pruned_params, compensated=compensated, added_bias_parameters=added)


def _block_constant(w0: torch.Tensor, b0: torch.Tensor | None, gram: GramSums, bias: str,
                    cross: CrossSums | None = None, feedback: float = 0.0) -> torch.Tensor | None:
    """The constant a fully removed block outputs: the mean original output (plus `feedback` × the
    mean stream error), or none for bias="none"."""
    if bias == "none" or gram.count == 0:
        return None
    mean = gram.sum / gram.count
    out = w0.to(mean.dtype) @ mean
    if cross is not None and cross.xe is not None and feedback > 0:
        out = out + feedback * cross.xe[-1].to(mean.dtype) / gram.count
    return out if b0 is None else out + b0.to(mean.dtype)


def _kept(n: int, removed: Sequence[int]) -> list[int]:
    gone = set(removed)
    return [i for i in range(n) if i not in gone]


def _scaled(cross: CrossSums | None, feedback: float) -> torch.Tensor | None:
    return None if cross is None or cross.xe is None or feedback == 0 else cross.xe * feedback


def _dense_layer(layer: nn.Module, attention: nn.Module, dense: list[torch.Tensor],
                 calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]], li: int
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run the still unpruned layer on the dense stream: (stream after its attention, after the layer)."""
    seen: list[torch.Tensor] = []

    def grab(_m: nn.Module, _a: tuple[Any, ...], out: Any) -> None:
        seen.append((out[0] if isinstance(out, tuple) else out).detach())

    mid: list[torch.Tensor] = []
    nxt: list[torch.Tensor] = []
    handle = attention.register_forward_hook(grab)
    try:
        for b, h in enumerate(dense):
            seen.clear()
            out = _run_layer(layer, h, calls[b][li])
            assert out is not None and len(seen) == 1
            mid.append(h + seen[0])
            nxt.append(out)
    finally:
        handle.remove()
    return mid, nxt


def _recorded_layer(recorded: DenseStream, li: int, need_mid: bool, owned: list[int], device: torch.device,
                    layer: nn.Module, attention: nn.Module, stream: list[torch.Tensor],
                    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]]
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(stream after layer li's attention, after layer li) of the dense model, from the recorded stream;
    a stream recorded without mid-layer states runs the layer on its recorded input for them."""
    nxt = recorded.output(li, owned, device)
    if not need_mid:
        return [], nxt
    mid = recorded.mid(li, owned, device)
    if mid is not None:
        return mid, nxt
    dense_in = recorded.output(li - 1, owned, device) if li else [h.clone() for h in stream]
    return _dense_layer(layer, attention, dense_in, calls, li)


def _constant_like(x: torch.Tensor, width: int, value: torch.Tensor | None) -> torch.Tensor:
    """A block output of `width` features for the tokens of `x`: the constant `value`, or zeros."""
    shape = (*x.shape[:-1], width)
    if value is None:
        return x.new_zeros(shape)
    return value.to(device=x.device, dtype=x.dtype).expand(shape).clone()


def _replay(outputs: list[torch.Tensor], batch_at: list[int]) -> Callable[..., Any]:
    """An attention forward that returns the stored output of the current batch (`batch_at[0]`)."""
    def forward(*_args: Any, **_kwargs: Any) -> tuple[torch.Tensor, None]:
        return outputs[batch_at[0]], None
    return forward
