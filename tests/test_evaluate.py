"""Perplexity: matches a hand computation, windows / tail handling, events, stop and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prune_core.errors import BadInput, Interrupted
from prune_core.evaluate import perplexity
from prune_core.events import Progress


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def hand_ppl(model: LlamaForCausalLM, tokens: torch.Tensor, seq_len: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for w in range(len(tokens) // seq_len):
        ids = tokens[w * seq_len:(w + 1) * seq_len]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
        for t in range(1, seq_len):  # token t predicted from tokens < t of its window
            total -= float(logp[t - 1, ids[t]])
            count += 1
    return math.exp(total / count), count


def test_perplexity_matches_hand_computation() -> None:
    model = tiny_llama()
    tokens = torch.randint(0, 50, (3 * 16 + 5,), generator=torch.Generator().manual_seed(1))  # 5-token tail dropped
    expected, count = hand_ppl(model, tokens, 16)
    events: list[object] = []
    out = perplexity(model, tokens, seq_len=16, batch_size=2, on_event=events.append, stage="eval_after")
    assert out["windows"] == 3 and out["tokens"] == count == 3 * 15 and out["seq_len"] == 16
    assert out["ppl"] == pytest.approx(expected, rel=1e-5)
    assert out["nll"] == pytest.approx(math.log(expected), rel=1e-5)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [(e.done, e.total, e.stage) for e in progress] == [(1, 2, "eval_after"), (2, 2, "eval_after")]
    same = perplexity(model, tokens, seq_len=16, batch_size=1)
    assert same["ppl"] == pytest.approx(out["ppl"], rel=1e-6)
    assert not model.training


def test_perplexity_bad_input_and_stop() -> None:
    model = tiny_llama()
    with pytest.raises(BadInput, match="seq_len"):
        perplexity(model, torch.arange(10) % 50, seq_len=16)
    with pytest.raises(Interrupted):
        perplexity(model, torch.arange(64) % 50, seq_len=8, should_stop=lambda: True)
    model.train()
    perplexity(model, torch.arange(32) % 50, seq_len=8, batch_size=4)
    assert model.training  # mode restored
