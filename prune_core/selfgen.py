"""Calibration windows sampled from the model itself, to mix with the dataset's windows.

Why: importance and reconstruction see only the calibration text, so a pruned model keeps what that
text needs and loses the rest (on smollm2-135m pruned by 40 % with Shakespeare calibration, perplexity
on Wikipedia text rose 6× while Shakespeare's rose 1.6×). Text the dense model writes itself covers
what the model knows in the proportions it knows it, needs no other dataset, and so keeps the pruned
model general (self-generated calibration; measured in BENCHMARKS.md, "Quality").

What: `generated_windows(model, tokenizer, n, seq_len, seed)` samples `n` sequences of `seq_len`
tokens (nucleus sampling, temperature 1, top-p 0.95, no end of text) from the tokenizer's
beginning-of-text token, in batches, with the random state forked from `seed`: the same model, seed
and device give the same windows, so cached importance and resumed runs stay valid (the windows are
part of the calibration fingerprint). Each batch reports progress and honours `should_stop`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prune_core.errors import BadInput, Interrupted
from prune_core.events import EventSink, Progress

TOP_P = 0.95
TEMPERATURE = 1.0
BATCH_SIZE = 64  # sequences sampled together: 1.5× the tokens/s of 16 on 2 CPU cores (memplan prices one batch)

__all__ = ["BATCH_SIZE", "TEMPERATURE", "TOP_P", "generated_windows"]


def _start_token(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int) and tid >= 0:
            return tid
    raise BadInput("the tokenizer has neither a beginning- nor an end-of-text token to start generating from",
                   "set [data] generated_samples = 0, or use a tokenizer with a bos or eos token")


def generated_windows(model: nn.Module, tokenizer: Any, num: int, seq_len: int, seed: int, *,
                      batch_size: int = BATCH_SIZE, on_event: EventSink | None = None,
                      should_stop: Callable[[], bool] | None = None, stage: str = "calibration") -> torch.Tensor:
    """[num, seq_len] int64 token ids sampled from `model` (see the module docstring); on the CPU."""
    if num < 1 or seq_len < 1 or batch_size < 1:
        raise BadInput(f"cannot generate {num} windows of {seq_len} tokens in batches of {batch_size}",
                       "use positive numbers")
    device = next(model.parameters()).device
    start = _start_token(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = start if not isinstance(pad, int) or pad < 0 else pad
    devices = [device] if device.type == "cuda" else []
    rows: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(int(seed))
            for done in range(0, num, batch_size):
                if should_stop is not None and should_stop():
                    raise Interrupted(f"generating calibration windows stopped after {done} of {num}",
                                      "run again: the windows are generated anew from the same seed")
                size = min(batch_size, num - done)
                prompt = torch.full((size, 1), start, dtype=torch.long, device=device)
                out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                     temperature=TEMPERATURE, top_p=TOP_P, top_k=0, max_new_tokens=seq_len,
                                     min_new_tokens=seq_len, pad_token_id=pad, use_cache=True)
                rows.append(out[:, 1:1 + seq_len].to("cpu", torch.long))
                if on_event is not None:
                    on_event(Progress(stage=stage, done=done + size, total=num, unit="generated windows",
                                      message=f"the model wrote {done + size} of {num} windows"))
    finally:
        if was_training:
            model.train()
    windows = torch.cat(rows).contiguous()
    if windows.shape != (num, seq_len):
        raise BadInput(f"the model generated {tuple(windows.shape)} tokens, expected {(num, seq_len)}",
                       "set [data] generated_samples = 0 for this model")
    return windows
