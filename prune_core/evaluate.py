"""Perplexity on held-out text: the before / after quality number of a pruning run.

The caller passes the first `max_tokens` tokens of the held-out split as a 1-D tensor. They are cut
into non-overlapping windows of `seq_len` tokens (an incomplete tail is dropped); each window is an
independent sequence, so within a window token t is predicted from tokens < t and the first token of
every window is never predicted: a window contributes seq_len − 1 predicted tokens.

    PPL = exp(mean NLL over all predicted tokens)   (NLL summed in float64, logits in float32)

Runs under torch.no_grad() in eval mode (the previous training mode is restored), on the model's
device, with the KV cache off. Emits one `Progress` event per window batch (the caller emits the
stage start / done events); `should_stop()` is polled after every batch and raises
`errors.Interrupted` (nothing to checkpoint: evaluation simply restarts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prune_core.errors import BadInput, Interrupted
from prune_core.events import EventSink, Progress


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def perplexity(model: nn.Module, tokens: torch.Tensor, *, seq_len: int, batch_size: int = 1,
               on_event: EventSink | None = None, should_stop: Callable[[], bool] | None = None,
               stage: str = "evaluate") -> dict[str, Any]:
    """{"ppl", "nll" (mean per predicted token), "tokens" (predicted), "seq_len", "windows", "seconds"}."""
    tokens = torch.as_tensor(tokens).reshape(-1).to(torch.long)
    if seq_len < 2:
        raise BadInput(f"evaluation seq_len {seq_len} is too short", "use seq_len >= 2")
    if batch_size < 1:
        raise BadInput(f"evaluation batch_size {batch_size} must be >= 1", "use batch_size >= 1")
    windows = tokens.numel() // seq_len
    if windows < 1:
        raise BadInput(f"{tokens.numel()} evaluation tokens make no window of seq_len {seq_len}",
                       f"use [evaluation] seq_len <= {max(2, tokens.numel())} or raise max_tokens / use more text")
    data = tokens[: windows * seq_len].reshape(windows, seq_len)
    device = _device_of(model)
    batches = math.ceil(windows / batch_size)
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    predicted = 0
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for b in range(batches):
                ids = data[b * batch_size:(b + 1) * batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                shift = logits[:, :-1, :].float()
                target = ids[:, 1:]
                loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="sum")
                nll_sum += float(loss.double())
                predicted += target.numel()
                if on_event is not None:
                    on_event(Progress(stage=stage, done=b + 1, total=batches, unit="batches",
                                      message=f"{min((b + 1) * batch_size, windows)}/{windows} windows, "
                                              f"ppl so far {_exp(nll_sum / predicted):.3f}"))
                if should_stop is not None and should_stop() and b + 1 < batches:
                    raise Interrupted("evaluation stopped", "run again to evaluate")
    finally:
        model.train(was_training)
    nll = nll_sum / predicted
    return {"ppl": _exp(nll), "nll": nll, "tokens": predicted, "seq_len": seq_len, "windows": windows,
            "seconds": time.perf_counter() - start}
