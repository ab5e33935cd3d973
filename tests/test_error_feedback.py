"""Reconstruction's error feedback: each refit also corrects a share of the error earlier pruned layers
left in the hidden states. Checked against the ridge system solved by numpy on a stream computed
independently from the dense and the pruned model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from prune_core.adapters import get_adapter
from prune_core.compensation import prune_and_reconstruct, ridge_refit
from prune_core.errors import BadInput
from prune_core.events import Notice
from prune_core.tiny import build_tiny

PRUNE = {0: {"attention": [1], "mlp": list(range(0, 128, 3))}, 1: {"mlp": list(range(40))}}


def tokens(n: int = 12, t: int = 32, seed: int = 0) -> torch.LongTensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def stacked_ridge(x: np.ndarray, target: np.ndarray, prior: np.ndarray, keep: list[int], ridge: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """min ‖[x_K, 1] Wᵀ − target‖² + λ‖W − prior‖², λ = ridge × mean diag (x_Kᵀ x_K): one lstsq."""
    xa = np.hstack([x[:, keep], np.ones((x.shape[0], 1))])
    lam = ridge * np.mean(np.sum(x[:, keep] ** 2, axis=0))
    a = np.vstack([xa, np.sqrt(lam) * np.eye(xa.shape[1])])
    rhs = np.vstack([target, np.sqrt(lam) * prior.T])
    sol = np.linalg.lstsq(a, rhs, rcond=None)[0].T
    return sol[:, :-1], sol[:, -1]


@pytest.mark.parametrize("mode", ["shrink", "none"])
def test_ridge_refit_with_an_error_target_equals_numpy_lstsq(mode: str) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 10)) + rng.normal(size=10)
    w, err = rng.normal(size=(4, 10)), rng.normal(size=(400, 4))
    keep = [0, 1, 4, 6, 9]
    xa = np.hstack([x, np.ones((400, 1))])
    cols = [*keep, 10] if mode == "shrink" else keep
    cross = torch.from_numpy(xa[:, cols].T @ err)
    new_w, new_b = ridge_refit(torch.from_numpy(w), None, torch.from_numpy(xa.T @ xa), keep, ridge=0.7,
                               bias_mode=mode, cross=cross)
    if mode == "shrink":
        prior = np.hstack([w[:, keep], np.zeros((4, 1))])
        ref_w, ref_b = stacked_ridge(x, x @ w.T + err, prior, keep, 0.7)
        np.testing.assert_allclose(new_b.numpy(), ref_b, rtol=1e-7, atol=1e-8)
    else:  # no bias column: the same system without the constant
        lam = 0.7 * np.mean(np.sum(x[:, keep] ** 2, axis=0))
        a = np.vstack([x[:, keep], np.sqrt(lam) * np.eye(len(keep))])
        rhs = np.vstack([x @ w.T + err, np.sqrt(lam) * w[:, keep].T])
        ref_w = np.linalg.lstsq(a, rhs, rcond=None)[0].T
        assert new_b is None
    np.testing.assert_allclose(new_w.numpy(), ref_w, rtol=1e-7, atol=1e-8)
    with pytest.raises(BadInput, match="cross term"):
        ridge_refit(torch.from_numpy(w), None, torch.from_numpy(xa.T @ xa), keep, ridge=0.7, cross=cross[:2])


def _layer_input(model: nn.Module, layer: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    h = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    h.remove()
    return seen


def _capture(model: nn.Module, modules: dict[str, nn.Module], ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Inputs (`name.in`) and outputs (`name.out`) of modules over one forward, rows = tokens, float64."""
    got: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, mod in modules.items():
        handles.append(mod.register_forward_pre_hook(
            lambda _m, a, name=name: got.setdefault(f"{name}.in", []).append(a[0].detach())))
        handles.append(mod.register_forward_hook(
            lambda _m, _a, y, name=name: got.setdefault(f"{name}.out", []).append(
                (y[0] if isinstance(y, tuple) else y).detach())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).double().numpy() for k, v in got.items()}


@pytest.mark.parametrize("feedback", [0.5, 1.0])
def test_second_layer_refit_aims_at_the_dense_stream(feedback: float) -> None:
    dense, _ = build_tiny("tiny-llama")
    pruned = copy.deepcopy(dense)
    adapter = get_adapter(pruned)
    ids = tokens()
    prune_and_reconstruct(pruned, adapter, PRUNE, ids, ridge=0.3, batch_size=4, error_feedback=feedback)

    # the original layer 1 on the pruned model's stream: the dense model with layer 0 swapped for the pruned one
    mixed = copy.deepcopy(dense)
    adapter.layers(mixed)[0] = copy.deepcopy(adapter.layers(pruned)[0])
    m1 = adapter.layers(mixed)[1]
    got = _capture(mixed, {"down": m1.mlp.down_proj, "layer": m1}, ids)
    dense_next = _capture(dense, {"layer": adapter.layers(dense)[1]}, ids)["layer.out"]
    target = got["down.out"] + feedback * (dense_next - got["layer.out"])
    keep = [j for j in range(128) if j not in set(PRUNE[1]["mlp"])]
    w0 = m1.mlp.down_proj.weight.detach().double().numpy()
    prior = np.hstack([w0[:, keep], np.zeros((w0.shape[0], 1))])
    ref_w, ref_b = stacked_ridge(got["down.in"], target, prior, keep, 0.3)
    down = adapter.parts(pruned, 1).down_proj
    np.testing.assert_allclose(down.weight.detach().double().numpy(), ref_w, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(down.bias.detach().double().numpy(), ref_b, rtol=1e-3, atol=2e-4)

    # layer 0 had no error to correct before its attention refit: its o_proj matches feedback 0 ... and the
    # MLP of layer 0 corrected what the attention refit left, so its output is closer to the dense stream
    plain = copy.deepcopy(dense)
    prune_and_reconstruct(plain, get_adapter(plain), PRUNE, ids, ridge=0.3, batch_size=4)
    torch.testing.assert_close(adapter.parts(pruned, 0).o_proj.weight, adapter.parts(plain, 0).o_proj.weight)
    dense_out = np.vstack([h.reshape(-1, h.shape[-1]).double().numpy()
                           for h in _layer_input(dense, adapter.layers(dense)[2], ids)])
    errors = {}
    for name, model in (("feedback", pruned), ("plain", plain)):
        out = np.vstack([h.reshape(-1, h.shape[-1]).double().numpy()
                         for h in _layer_input(model, adapter.layers(model)[2], ids)])
        errors[name] = float(np.linalg.norm(out - dense_out))
    assert errors["feedback"] < errors["plain"]


def test_normalised_block_outputs_get_no_feedback_and_a_notice() -> None:
    model, _ = build_tiny("tiny-gemma2")
    plain = copy.deepcopy(model)
    ids = tokens()
    prune = {0: {"mlp": list(range(20))}, 1: {"mlp": list(range(20))}}
    events: list = []
    prune_and_reconstruct(model, get_adapter(model), prune, ids, error_feedback=0.5, on_event=events.append)
    prune_and_reconstruct(plain, get_adapter(plain), prune, ids)
    assert any(isinstance(e, Notice) and "error_feedback" in e.message for e in events)
    for a, b in zip(model.state_dict().values(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_feedback_is_refused(bad: object) -> None:
    model, _ = build_tiny("tiny-llama")
    with pytest.raises(BadInput, match="error_feedback"):
        prune_and_reconstruct(model, get_adapter(model), PRUNE, tokens(), error_feedback=bad)  # type: ignore[arg-type]


def test_infinite_ridge_with_a_free_bias_takes_the_mean_error() -> None:
    # ridge = ∞ keeps W_K; bias "fit" leaves the bias free: its least-squares value is b + mean(X_R W_Rᵀ + E)
    rng = np.random.default_rng(5)
    x, w, b, err = rng.normal(size=(300, 6)) + 0.5, rng.normal(size=(3, 6)), rng.normal(size=3), rng.normal(size=(300, 3))
    keep = [0, 2, 5]
    xa = np.hstack([x, np.ones((300, 1))])
    cross = torch.from_numpy(xa[:, [*keep, 6]].T @ err)
    new_w, new_b = ridge_refit(torch.from_numpy(w), torch.from_numpy(b), torch.from_numpy(xa.T @ xa), keep,
                               ridge=math.inf, bias_mode="fit", cross=cross)
    rest = [1, 3, 4]
    np.testing.assert_allclose(new_w.numpy(), w[:, keep])
    np.testing.assert_allclose(new_b.numpy(), b + (x[:, rest] @ w[:, rest].T + err).mean(0), rtol=1e-10)
