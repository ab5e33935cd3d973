"""block_importance: the zeroing / skipping hooks really remove the block (checked against edited weights)."""

from __future__ import annotations

import copy

import pytest
import torch

from prune_core.adapters import get_adapter
from prune_core.errors import Interrupted
from prune_core.events import Progress, StageDone, StageStarted
from prune_core.importance import BlockImportance, block_importance
from prune_core.importance.block_loss import ablated, mean_loss
from prune_core.tiny import build_tiny

TOKENS = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(21))


def zeroed(model: torch.nn.Module, layer: int, *names: str) -> torch.nn.Module:
    """A copy with the named projections' weights (and biases) of `layer` set to zero."""
    out = copy.deepcopy(model)
    block = out.model.layers[layer]
    with torch.no_grad():
        for name in names:
            module = block.self_attn.o_proj if name == "o_proj" else block.mlp.down_proj
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    return out


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_block_losses_match_zeroed_weights(family: str) -> None:
    model = build_tiny(family)[0].double()
    adapter = get_adapter(model)
    events: list = []
    result = block_importance(model, adapter, TOKENS, batch_size=2, on_event=events.append)
    base = mean_loss(model, TOKENS, 2)
    assert result.base_loss == base
    layers = adapter.num_layers(model)
    assert len(result.attention) == len(result.mlp) == len(result.layer) == layers
    for layer in range(layers):
        # zeroed o_proj => attention output exactly 0 with the residual kept
        assert result.attention[layer] == pytest.approx(
            mean_loss(zeroed(model, layer, "o_proj"), TOKENS, 2) - base, abs=1e-12
        )
        assert result.mlp[layer] == pytest.approx(
            mean_loss(zeroed(model, layer, "down_proj"), TOKENS, 2) - base, abs=1e-12
        )
        # both zeroed => the layer adds nothing to the residual stream: same as skipping it
        assert result.layer[layer] == pytest.approx(
            mean_loss(zeroed(model, layer, "o_proj", "down_proj"), TOKENS, 2) - base, abs=1e-12
        )
    assert isinstance(events[0], StageStarted) and events[0].total == 1 + 3 * layers
    assert isinstance(events[-1], StageDone)
    assert [e.done for e in events if isinstance(e, Progress)] == list(range(1, 2 + 3 * layers))
    assert BlockImportance.from_dict(result.to_dict()) == result


def test_layer_skip_returns_the_input_hidden_states() -> None:
    model = build_tiny("tiny-mistral")[0]
    adapter = get_adapter(model)
    layer = adapter.layers(model)[1]
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad(), ablated(model, adapter, 1, "layer"):
        # registered after the skip hook, so this one sees the replaced output
        pre = layer.register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("in", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        post = layer.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
        try:
            model(TOKENS[:1], use_cache=False)
        finally:
            pre.remove()
            post.remove()
    out = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
    assert out is seen["in"] or torch.equal(out, seen["in"])
    # hooks are gone afterwards: the model computes as before
    with torch.no_grad():
        a = model(TOKENS[:2], use_cache=False).logits
        with ablated(model, adapter, 1, "attention"):
            b = model(TOKENS[:2], use_cache=False).logits
        c = model(TOKENS[:2], use_cache=False).logits
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_block_importance_respects_should_stop() -> None:
    model = build_tiny("tiny-llama")[0]
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    with pytest.raises(Interrupted, match="3/13"):
        block_importance(model, get_adapter(model), TOKENS, batch_size=5, should_stop=should_stop)
    assert all(not m._forward_hooks for m in model.modules())
