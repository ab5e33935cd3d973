"""Weight gradients summed inside the backward GEMM (fused_linear.py, accumulate.py's sunk weights).

The sunk path must give the sums, statistics and failure behaviour of the `.grad` path it replaces:
the same Σg and Σn·g² (to rounding), the same input and bias gradients, the module restored
afterwards, and a failed batch taken back out (or the sums marked damaged when it cannot be).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_core.adapters import get_adapter
from prune_core.importance.accumulate import GradientAccumulator, NonFiniteGradient
from prune_core.importance.fused_linear import can_sink, sunk_linears
from prune_core.importance.groups import prunable_targets
from prune_core.tiny import build_tiny

TOKENS = torch.randint(0, 250, (6, 12), generator=torch.Generator().manual_seed(3))


def test_sunk_linear_gives_the_same_gradients_and_restores_the_module() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    x = torch.randn(2, 3, 5, requires_grad=True)
    y = lin(x)
    y.square().sum().backward()
    want_x, want_w, want_b = x.grad.clone(), lin.weight.grad.clone(), lin.bias.grad.clone()
    x.grad = lin.weight.grad = lin.bias.grad = None
    seen: list[torch.Tensor] = []
    with sunk_linears({lin: lambda gy, xs, probe: seen.append(gy.t() @ xs)}):
        assert "forward" in vars(lin)
        out = lin(x)
        torch.testing.assert_close(out, y)
        out.square().sum().backward()
    assert "forward" not in vars(lin) and can_sink(lin)
    torch.testing.assert_close(x.grad, want_x)
    torch.testing.assert_close(lin.bias.grad, want_b)
    assert lin.weight.grad is None  # the weight gradient went to the sink instead
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], want_w)


def test_only_plain_unwrapped_linears_take_a_sink() -> None:
    class Sub(nn.Linear):
        pass

    wrapped = nn.Linear(2, 2)
    wrapped.forward = lambda x: x  # e.g. accelerate's device hooks replace forward
    assert not can_sink(Sub(2, 2)) and not can_sink(wrapped) and can_sink(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="plain, unwrapped Linear"), sunk_linears({wrapped: lambda gy, x, probe: None}):
        pass


def _accumulator(model: nn.Module, *, sunk: bool, second_order: bool, share: float = 1.0) -> GradientAccumulator:
    adapter = get_adapter(model)
    parts = adapter.all_parts(model)
    targets = prunable_targets(parts)
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        t.param.requires_grad_(True)
    linears = {i: parts[t.layer].linear(t.path) for i, t in enumerate(targets) if t.kind == "weight"}
    return GradientAccumulator([(t.key, t.param) for t in targets], second_order=second_order,
                               linears=linears if sunk else None, stats_sample=share)


def _loss(model: nn.Module, b: int) -> torch.Tensor:
    ids = TOKENS[2 * b: 2 * b + 2]
    return model(input_ids=ids, labels=ids, use_cache=False).loss


@pytest.mark.parametrize("second_order", [False, True])
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-phi3"])
def test_sunk_sums_and_stats_equal_the_grad_path(family: str, second_order: bool) -> None:
    model = build_tiny(family)[0].eval()
    results = []
    for sunk in (False, True):
        acc = _accumulator(model, sunk=sunk, second_order=second_order, share=0.25)
        assert (acc.sunk > 0) == sunk
        with acc:
            rows = [acc.accumulate(_loss(model, b), weight=22.0) for b in range(3)]
            results.append((rows, {k: v.clone() for k, v in acc.state_tensors().items()}, list(acc.counts)))
    (rows_a, sums_a, counts_a), (rows_b, sums_b, counts_b) = results
    assert counts_a == counts_b
    torch.testing.assert_close(torch.tensor(rows_b), torch.tensor(rows_a), rtol=1e-5, atol=1e-7)
    assert sums_a.keys() == sums_b.keys()
    for key in sums_a:
        torch.testing.assert_close(sums_b[key], sums_a[key], rtol=1e-5, atol=1e-7, msg=key)
    # a sunk weight never holds a .grad
    assert all(p.grad is None for p in model.parameters())


def _poison_backward(model: nn.Module) -> torch.utils.hooks.RemovableHandle:
    """NaN into the output gradient of layer 1's down_proj, for the next forward only."""
    armed = {"on": True}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if armed["on"] and torch.is_grad_enabled():
            armed["on"] = False
            out.register_hook(lambda g: torch.full_like(g, float("nan")))

    return model.model.layers[1].mlp.down_proj.register_forward_hook(hook)


@pytest.mark.parametrize("second_order", [False, True])
def test_a_failed_batch_is_taken_back_out_by_recomputing_it(second_order: bool) -> None:
    model = build_tiny("tiny-llama")[0].eval()
    with _accumulator(model, sunk=True, second_order=second_order) as acc:
        acc.accumulate(_loss(model, 0), weight=22.0)
        before = {k: v.clone() for k, v in acc.state_tensors().items()}
        handle = _poison_backward(model)
        try:
            with pytest.raises(NonFiniteGradient) as info:
                acc.accumulate(_loss(model, 1), weight=22.0, recompute=lambda: _loss(model, 1))
        finally:
            handle.remove()
        assert info.value.key == "layers.1.down_proj.weight" and not acc.damaged
        for key, value in acc.state_tensors().items():
            assert torch.isfinite(value).all(), key
            torch.testing.assert_close(value, before[key], rtol=1e-5, atol=1e-6, msg=key)
        assert acc.batches == 1
        acc.accumulate(_loss(model, 2), weight=22.0)  # and it goes on
        assert acc.batches == 2


def test_without_a_recomputation_the_sums_are_marked_damaged() -> None:
    model = build_tiny("tiny-llama")[0].eval()
    with _accumulator(model, sunk=True, second_order=False) as acc:
        acc.accumulate(_loss(model, 0))
        handle = _poison_backward(model)
        try:
            with pytest.raises(NonFiniteGradient):
                acc.accumulate(_loss(model, 1))
        finally:
            handle.remove()
        assert acc.damaged
        with pytest.raises(RuntimeError, match="damaged"):
            acc.accumulate(_loss(model, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_the_probe_is_non_finite_exactly_when_the_output_gradient_is(bad: float | None) -> None:
    torch.manual_seed(1)
    lin = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        lin.weight[1, 0] = 0.0  # Inf · 0 is NaN: still non-finite
    x = torch.randn(2, 5, 4, requires_grad=True)
    probes: list[torch.Tensor] = []
    with sunk_linears({lin: lambda gy, xs, probe: probes.append(probe.sum())}):
        y = lin(x)
        if bad is not None:
            y.register_hook(lambda g: g.index_put((torch.tensor(1), torch.tensor(2), torch.tensor(1)),
                                                  torch.tensor(bad)))
        y.sum().backward()
    assert len(probes) == 1
    assert bool(torch.isfinite(probes[0])) == (bad is None)


def test_a_weight_with_gradient_hooks_keeps_the_grad_path() -> None:
    """Someone else's hook on a weight's gradient (rescaling it, say) must still see and change it."""
    model = build_tiny("tiny-llama")[0].eval()
    up = model.model.layers[1].mlp.up_proj.weight
    plain = _accumulator(model, sunk=True, second_order=False)
    with plain:
        plain.accumulate(_loss(model, 0))
        want = plain.sum_grad(plain.index("layers.1.up_proj.weight")).clone()
    handle = up.register_hook(lambda g: g * 3.0)
    try:
        hooked = _accumulator(model, sunk=True, second_order=False)
        assert hooked.sunk == plain.sunk - 1
        with hooked:
            hooked.accumulate(_loss(model, 0))
            got = hooked.sum_grad(hooked.index("layers.1.up_proj.weight"))
    finally:
        handle.remove()
    torch.testing.assert_close(got, 3.0 * want, rtol=1e-5, atol=1e-7)
