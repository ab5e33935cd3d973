"""The importance engine against brute force: every group's score recomputed independently.

The reference here does its own per-batch backward passes (torch.autograd.grad) and its own group
slicing, written from the definitions (KV head k = k/v rows [k·d, (k+1)·d), q rows and o_proj
columns [k·r·d, (k+1)·r·d), q/k/v biases; MLP channel j = gate/up row j (+ biases), down column j),
on float64 copies of the three tiny families, with an uneven last batch.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from prune_core.adapters import get_adapter
from prune_core.errors import BadInput
from prune_core.events import BatchDone, StageDone, StageStarted
from prune_core.importance import GradientAccumulator, ImportanceResult, run_importance
from prune_core.tiny import build_tiny

FAMILIES = ("tiny-llama", "tiny-mistral", "tiny-qwen2")
N, S, BS = 5, 12, 2  # 3 batches: 2 + 2 + 1 rows
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tokens_for(seed: int = 0, n: int = N, s: int = S) -> torch.Tensor:
    return torch.randint(0, 256, (n, s), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=FAMILIES)
def model64(request: pytest.FixtureRequest) -> torch.nn.Module:
    model, _ = build_tiny(request.param)
    return model.double()


def modules_of(model: torch.nn.Module, layer: int) -> dict[str, torch.nn.Linear]:
    block = model.model.layers[layer]
    a, m = block.self_attn, block.mlp
    return {
        "q_proj": a.q_proj,
        "k_proj": a.k_proj,
        "v_proj": a.v_proj,
        "o_proj": a.o_proj,
        "gate_proj": m.gate_proj,
        "up_proj": m.up_proj,
        "down_proj": m.down_proj,
    }


def scored_params(model: torch.nn.Module) -> dict[tuple[int, str, str], torch.nn.Parameter]:
    """(layer, module, "weight"|"bias") -> parameter, for every weight and the q/k/v/gate/up biases."""
    out = {}
    for layer in range(len(model.model.layers)):
        for name, lin in modules_of(model, layer).items():
            out[(layer, name, "weight")] = lin.weight
            if lin.bias is not None and name not in ("o_proj", "down_proj"):
                out[(layer, name, "bias")] = lin.bias
    return out


def group_pieces(model: torch.nn.Module, values: dict, layer: int, block: str, g: int) -> list[torch.Tensor]:
    """The slices of parameter-shaped `values` that belong to group g, by hand from the definitions."""
    cfg = model.config
    d = cfg.head_dim
    r = cfg.num_attention_heads // cfg.num_key_value_heads

    def get(name: str, kind: str = "weight") -> torch.Tensor | None:
        return values.get((layer, name, kind))

    pieces: list[torch.Tensor | None]
    if block == "attention":
        q_rows, kv_rows = slice(g * r * d, (g + 1) * r * d), slice(g * d, (g + 1) * d)
        pieces = [
            get("q_proj")[q_rows, :],
            get("k_proj")[kv_rows, :],
            get("v_proj")[kv_rows, :],
            get("o_proj")[:, q_rows],
        ]
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            bias = get(name, "bias")
            if bias is not None:
                pieces.append(bias[rows])
    else:
        pieces = [get("gate_proj")[g, :], get("up_proj")[g, :], get("down_proj")[:, g]]
        for name in ("gate_proj", "up_proj"):
            bias = get(name, "bias")
            if bias is not None:
                pieces.append(bias[g : g + 1])
    return [p for p in pieces if p is not None]


def brute_force(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """ḡ, F (both scales), wanda input norms, input sums, per-batch gradients — no engine code."""
    params = scored_params(model)
    keys = list(params)
    gsum = {k: torch.zeros_like(p) for k, p in params.items()}
    f_tokens = {k: torch.zeros_like(p) for k, p in params.items()}
    f_none = {k: torch.zeros_like(p) for k, p in params.items()}
    sq_in: dict[tuple[int, str], torch.Tensor] = {}
    sum_in: dict[tuple[int, str], torch.Tensor] = {}
    batch_grads = []
    captured: list[tuple[int, str, torch.Tensor]] = []
    handles = []
    for layer in range(len(model.model.layers)):
        for name, lin in modules_of(model, layer).items():
            handles.append(
                lin.register_forward_pre_hook(
                    lambda mod, args, layer=layer, name=name: captured.append((layer, name, args[0].detach()))
                )
            )
    batches = [(i, min(i + batch_size, tokens.shape[0])) for i in range(0, tokens.shape[0], batch_size)]
    try:
        for lo, hi in batches:
            ids = tokens[lo:hi]
            model.zero_grad(set_to_none=True)
            captured.clear()
            loss = model(ids, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, [params[k] for k in keys])
            n = (hi - lo) * (tokens.shape[1] - 1)
            g = dict(zip(keys, grads, strict=True))
            batch_grads.append(g)
            for k in keys:
                gsum[k] += g[k]
                f_tokens[k] += n * g[k] ** 2
                f_none[k] += g[k] ** 2
            for layer, name, x in captured:
                x2 = x.reshape(-1, x.shape[-1])
                sq_in[(layer, name)] = sq_in.get((layer, name), 0) + (x2**2).sum(0)
                sum_in[(layer, name)] = sum_in.get((layer, name), 0) + x2.sum(0)
    finally:
        for h in handles:
            h.remove()
    b = len(batches)
    return {
        "params": params,
        "mean_grad": {k: v / b for k, v in gsum.items()},
        "fisher": {
            "tokens": {k: v / b for k, v in f_tokens.items()},
            "none": {k: v / b for k, v in f_none.items()},
        },
        "input_norm": {k: v.sqrt() for k, v in sq_in.items()},
        "input_sum": sum_in,
        "batch_grads": batch_grads,
        "batches": b,
    }


def expected_scores(
    model: torch.nn.Module, ref: dict[str, Any], method: str, aggregation: str, fisher_scale: str
) -> dict[str, torch.Tensor]:
    params, gbar = ref["params"], ref["mean_grad"]
    w = {k: p.detach() for k, p in params.items()}
    wg = {k: w[k] * gbar[k] for k in w}
    second = {k: w[k] ** 2 * ref["fisher"][fisher_scale][k] for k in w}
    wanda = {k: w[k].abs() * ref["input_norm"][(k[0], k[1])][None, :] for k in w if k[2] == "weight"}
    cfg = model.config
    out = {}
    for block, groups in (("attention", cfg.num_key_value_heads), ("mlp", cfg.intermediate_size)):
        table = torch.zeros(cfg.num_hidden_layers, groups, dtype=torch.float64)
        for layer in range(cfg.num_hidden_layers):
            for g in range(groups):
                if method == "wanda":
                    value = sum(p.sum() for p in group_pieces(model, wanda, layer, block, g))
                else:
                    pieces = group_pieces(model, wg, layer, block, g)
                    if aggregation == "element":
                        value = sum(p.abs().sum() for p in pieces)
                    else:
                        value = sum(p.sum() for p in pieces).abs()
                    if method == "taylor_2nd":
                        value = value + 0.5 * sum(
                            p.sum() for p in group_pieces(model, second, layer, block, g)
                        )
                table[layer, g] = value
        out[block] = table
    return out


CASES = [
    ("taylor", "element", "tokens"),
    ("taylor", "vector", "tokens"),
    ("taylor_2nd", "element", "tokens"),
    ("taylor_2nd", "vector", "tokens"),
    ("taylor_2nd", "element", "none"),
    ("taylor_2nd", "vector", "none"),
    ("wanda", "element", "tokens"),
]


def test_engine_matches_brute_force(model64: torch.nn.Module) -> None:
    tokens = tokens_for()
    ref = brute_force(model64, tokens, BS)
    assert ref["batches"] == 3
    adapter = get_adapter(model64)
    for method, aggregation, fisher_scale in CASES:
        result = run_importance(
            model64,
            adapter,
            tokens,
            method=method,
            aggregation=aggregation,
            fisher_scale=fisher_scale,
            batch_size=BS,
        )
        want = expected_scores(model64, ref, method, aggregation, fisher_scale)
        label = f"{model64.config.model_type} {method}/{aggregation}/{fisher_scale}"
        assert result.attention.dtype == torch.float64, label
        torch.testing.assert_close(result.attention, want["attention"], rtol=1e-9, atol=1e-12, msg=label)
        torch.testing.assert_close(result.mlp, want["mlp"], rtol=1e-9, atol=1e-12, msg=label)
        if method == "taylor_2nd":
            first = expected_scores(model64, ref, "taylor", aggregation, fisher_scale)
            torch.testing.assert_close(
                result.first_order["attention"], first["attention"], rtol=1e-9, atol=1e-12
            )
            torch.testing.assert_close(result.first_order["mlp"], first["mlp"], rtol=1e-9, atol=1e-12)
        else:
            assert result.first_order is None
        # input sums for bias compensation: every pass, all tokens
        assert result.input_tokens == N * S and result.tokens == N * S and result.batches == 3
        for name in ("o_proj", "down_proj"):
            want_sums = torch.stack(
                [ref["input_sum"][(layer, name)] for layer in range(model64.config.num_hidden_layers)]
            )
            torch.testing.assert_close(result.input_sums[name], want_sums, rtol=1e-10, atol=1e-10)


def _block_stats(values: list[torch.Tensor]) -> dict[str, float]:
    flat = torch.cat([v.reshape(-1) for v in values])
    return {
        "mean": flat.abs().mean().item(),
        "std": flat.std(unbiased=False).item(),
        "norm": flat.norm().item(),
        "max": flat.abs().max().item(),
        "min": flat.abs().min().item(),
    }


def _sampled_rows(g: torch.Tensor, k: int, share: float) -> torch.Tensor:
    """The block of rows the thinned statistics read in their k-th batch (accumulate.py's rule, written out)."""
    if share >= 1.0 or g.dim() < 2:
        return g
    size = max(1, math.ceil(g.shape[0] * share))
    lo = (k * size) % g.shape[0]
    return g[lo:min(lo + size, g.shape[0])]


@pytest.mark.parametrize(("method", "share", "every"),
                         [("taylor", 1.0, 1), ("taylor", 0.25, 1), ("taylor_2nd", 0.3, 2)])
def test_live_gradient_stats_match_brute_force(model64: torch.nn.Module, method: str, share: float,
                                               every: int) -> None:
    tokens = tokens_for()
    ref = brute_force(model64, tokens, BS)
    events: list = []
    result = run_importance(
        model64, get_adapter(model64), tokens, method=method, batch_size=BS, on_event=events.append,
        stats_sample=share, stats_every=every,
    )
    assert result.metadata["stats_sample"] == share and result.metadata["stats_every"] == every
    done = [e for e in events if isinstance(e, BatchDone)]
    assert [e.batch for e in done] == [1, 2, 3] and all(e.total == 3 for e in done)
    assert all(e.stats_label == "gradient" for e in done)
    for b, g in enumerate(ref["batch_grads"]):
        if b % every:  # no statistics taken: the event repeats the latest ones, the record says none
            assert result.batch_stats[b]["stats"] is None
            assert done[b].layer_stats == done[b - b % every].layer_stats
            continue
        g = {k: _sampled_rows(v, b // every, share) for k, v in g.items()}
        for layer in range(model64.config.num_hidden_layers):
            att = [v for k, v in g.items() if k[0] == layer and k[1] in LINEARS[:4]]
            mlp = [v for k, v in g.items() if k[0] == layer and k[1] in LINEARS[4:]]
            for block, values in (("attention", att), ("mlp", mlp), ("layer", att + mlp)):
                want = _block_stats(values)
                for stat, value in want.items():
                    got = done[b].layer_stats[block][stat][layer]
                    assert got == pytest.approx(value, rel=1e-9, abs=1e-15), (b, layer, block, stat)
                    assert result.batch_stats[b]["stats"][block][stat][layer] == got
    # aggregate: mean/std/norm averaged over batches, max = max, min = min
    for stat, combine in (
        ("mean", lambda xs: sum(xs) / len(xs)),
        ("norm", lambda xs: sum(xs) / len(xs)),
        ("max", max),
        ("min", min),
    ):
        for layer in range(model64.config.num_hidden_layers):
            xs = [bs["stats"]["mlp"][stat][layer] for bs in result.batch_stats if bs["stats"] is not None]
            assert result.stats["mlp"][stat][layer] == pytest.approx(combine(xs), rel=1e-12)
    assert [bs["loss"] for bs in result.batch_stats] == [e.loss for e in done]
    assert done[-1].mean_loss == pytest.approx(sum(e.loss for e in done) / 3)


def test_wanda_activation_stats_and_no_backward(model64: torch.nn.Module) -> None:
    tokens = tokens_for()
    adapter = get_adapter(model64)
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for layer in range(model64.config.num_hidden_layers):
        for name in ("q_proj", "o_proj", "gate_proj", "down_proj"):  # the four distinct inputs of a layer
            lin = modules_of(model64, layer)[name]
            handles.append(
                lin.register_forward_pre_hook(
                    lambda mod, args, key=(layer, name): captured.setdefault(key, []).append(args[0].detach())
                )
            )
    events: list = []
    try:
        result = run_importance(
            model64, adapter, tokens, method="wanda", batch_size=BS, on_event=events.append
        )
    finally:
        for h in handles:
            h.remove()
    assert result.stats_label == "activation"
    assert all(p.grad is None for p in model64.parameters())
    first = next(e for e in events if isinstance(e, BatchDone))
    assert first.stats_label == "activation"
    for layer in range(model64.config.num_hidden_layers):
        att = [captured[(layer, "q_proj")][0], captured[(layer, "o_proj")][0]]
        mlp = [captured[(layer, "gate_proj")][0], captured[(layer, "down_proj")][0]]
        for block, values in (("attention", att), ("mlp", mlp), ("layer", att + mlp)):
            for stat, value in _block_stats(values).items():
                assert first.layer_stats[block][stat][layer] == pytest.approx(value, rel=1e-9), (
                    layer,
                    block,
                    stat,
                )


def test_taylor_2nd_ranks_differently_from_taylor() -> None:
    """The seed bug (F = (Σg)², i.e. a function of ḡ) made taylor_2nd rank like taylor; not any more."""
    model, _ = build_tiny("tiny-llama")
    adapter = get_adapter(model)
    tokens = tokens_for(seed=3, n=8, s=16)
    first = run_importance(model, adapter, tokens, method="taylor", batch_size=2)
    second = run_importance(model, adapter, tokens, method="taylor_2nd", batch_size=2)
    torch.testing.assert_close(second.first_order["mlp"], first.mlp)
    assert not torch.equal(torch.argsort(first.mlp, dim=1), torch.argsort(second.mlp, dim=1))
    assert not torch.equal(torch.argsort(first.mlp.flatten()), torch.argsort(second.mlp.flatten()))


def test_fisher_is_mean_of_squared_batch_gradients_not_square_of_mean() -> None:
    model, _ = build_tiny("tiny-qwen2")
    model = model.double()
    tokens = tokens_for(seed=4, n=6, s=10)
    named = [(f"p{i}", p) for i, p in enumerate(scored_params(model).values())]
    per_batch = []
    with GradientAccumulator(named, second_order=True) as acc:
        for lo in range(0, 6, 2):
            ids = tokens[lo : lo + 2]
            ref = torch.autograd.grad(model(ids, labels=ids, use_cache=False).loss, [p for _, p in named])
            per_batch.append(ref)
            acc.accumulate(model(ids, labels=ids, use_cache=False).loss, weight=2 * 9)
    assert acc.batches == 3
    for i, (key, _) in enumerate(named):
        gs = torch.stack([g[i] for g in per_batch])
        want_f = 18 * (gs**2).mean(0)
        torch.testing.assert_close(acc.fisher(key), want_f, rtol=1e-12, atol=1e-18)
        torch.testing.assert_close(acc.mean_grad(key), gs.mean(0), rtol=1e-12, atol=1e-18)
        if i == 0:
            square_of_mean = 18 * gs.mean(0) ** 2
            square_of_sum = 18 * gs.sum(0) ** 2
            assert not torch.allclose(acc.fisher(key), square_of_mean, rtol=1e-3)
            assert not torch.allclose(acc.fisher(key), square_of_sum, rtol=1e-3)
            assert torch.all(acc.fisher(key) >= square_of_mean * (1 - 1e-12))  # Jensen: E[g²] ≥ E[g]²


def test_deferred_mode_matches_streaming() -> None:
    """Accelerators use deferred mode (one sync per batch); it must accumulate the same sums."""
    model, _ = build_tiny("tiny-mistral")
    tokens = tokens_for(seed=5, n=4, s=10)
    named = [(str(k), p) for k, p in scored_params(model).items()]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    accs = {}
    for streaming in (True, False):
        with GradientAccumulator(named, second_order=True, streaming=streaming) as acc:
            rows = [
                acc.accumulate(model(tokens[i : i + 2], labels=tokens[i : i + 2], use_cache=False).loss, 5.0)
                for i in (0, 2)
            ]
        accs[streaming] = (acc, rows)
    (a, rows_a), (b, rows_b) = accs[True], accs[False]
    assert rows_a == rows_b
    for key, _ in named:
        assert torch.equal(a.mean_grad(key), b.mean_grad(key))
        assert torch.equal(a.fisher(key), b.fisher(key))
    for p in model.parameters():
        p.requires_grad_(True)


def test_model_state_restored_and_result_round_trip(tmp_path) -> None:
    model, _ = build_tiny("tiny-qwen2")
    model.train()
    model.model.norm.weight.requires_grad_(False)
    before_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before_training = {n: m.training for n, m in model.named_modules()}
    events: list = []
    result = run_importance(
        model,
        get_adapter(model),
        tokens_for(n=4),
        method="taylor_2nd",
        batch_size=2,
        identity={"model": "x"},
        on_event=events.append,
    )
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_flags
    assert {n: m.training for n, m in model.named_modules()} == before_training
    assert all(p.grad is None for p in model.parameters())
    kinds = [type(e) for e in events]
    assert kinds[0] is StageStarted and kinds[-1] is StageDone and kinds.count(BatchDone) == 2
    assert events[0].total == 2

    result.save(tmp_path / "imp")
    loaded = ImportanceResult.load(tmp_path / "imp")
    for name in ("attention", "mlp"):
        assert torch.equal(getattr(loaded, name), getattr(result, name))
    for k in ("attention", "mlp"):
        assert torch.equal(loaded.first_order[k], result.first_order[k])
    for k in ("o_proj", "down_proj"):
        assert torch.equal(loaded.input_sums[k], result.input_sums[k])
    assert loaded.stats == result.stats and loaded.batch_stats == result.batch_stats
    assert (loaded.method, loaded.aggregation, loaded.fisher_scale, loaded.stats_label) == (
        "taylor_2nd",
        "element",
        "tokens",
        "gradient",
    )
    assert (loaded.input_tokens, loaded.batches, loaded.tokens) == (result.input_tokens, 2, result.tokens)
    assert loaded.metadata["attention_groups"] == [2, 2, 2, 2]
    assert loaded.metadata["identity"]["caller"] == {"model": "x"}
    assert torch.allclose(loaded.input_means()["o_proj"], result.input_sums["o_proj"] / (4 * S))


def test_gradient_checkpointing_gives_the_same_scores() -> None:
    model, _ = build_tiny("tiny-llama")
    adapter = get_adapter(model)
    tokens = tokens_for(seed=6, n=4, s=16)
    plain = run_importance(model, adapter, tokens, method="taylor_2nd", batch_size=2)
    ckpt = run_importance(
        model, adapter, tokens, method="taylor_2nd", batch_size=2, gradient_checkpointing=True
    )
    torch.testing.assert_close(ckpt.attention, plain.attention, rtol=1e-5, atol=0)
    torch.testing.assert_close(ckpt.mlp, plain.mlp, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        ckpt.input_sums["o_proj"], plain.input_sums["o_proj"]
    )  # counted once, not twice
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not any(m.training for m in model.modules())


def test_bfloat16_model_accumulates_in_float32() -> None:
    model, _ = build_tiny("tiny-llama")
    model = model.to(torch.bfloat16)
    named = [(str(k), p) for k, p in scored_params(model).items()]
    acc = GradientAccumulator(named, second_order=True)
    assert all(t.dtype == torch.float32 for t in acc.state_tensors().values())
    result = run_importance(model, get_adapter(model), tokens_for(n=4), method="taylor_2nd", batch_size=2)
    assert torch.isfinite(result.attention).all() and torch.isfinite(result.mlp).all()
    assert result.metadata["dtype"] == "bfloat16"
    assert (result.mlp > 0).all()


def test_bad_arguments_are_bad_input() -> None:
    model, _ = build_tiny("tiny-llama")
    adapter = get_adapter(model)
    tokens = tokens_for(n=2)
    bad = [
        {"method": "obs"},  # not registered
        {"method": "taylor", "aggregation": "sum"},
        {"method": "taylor", "fisher_scale": "batch"},
        {"method": "taylor", "batch_size": 0},
        {"method": "taylor", "hessian_device": "gpu7"},
    ]
    for kwargs in bad:
        kwargs.setdefault("batch_size", 1)
        with pytest.raises(BadInput):
            run_importance(model, adapter, tokens, **kwargs)
    with pytest.raises(BadInput):
        run_importance(model, adapter, tokens[:, :1], method="taylor", batch_size=1)
    with pytest.raises(BadInput):
        run_importance(model, adapter, tokens.float(), method="taylor", batch_size=1)


def test_scores_are_finite_and_positive_for_every_family() -> None:
    for family in FAMILIES:
        model, _ = build_tiny(family)
        model_copy = copy.deepcopy(model)
        for method in ("taylor", "taylor_2nd", "wanda"):
            r = run_importance(model, get_adapter(model), tokens_for(n=3, s=8), method=method, batch_size=3)
            assert r.attention.shape == (4, 2) and r.mlp.shape == (4, 128)
            assert torch.isfinite(r.attention).all() and (r.mlp >= 0).all()
            assert all(math.isfinite(x) for x in r.stats["layer"]["norm"])
        for a, b in zip(model.parameters(), model_copy.parameters(), strict=True):
            assert torch.equal(a, b)  # the pass never changes weights


def test_scores_from_the_sums_match_the_in_hook_scores() -> None:
    """The engine scores the last batch inside the hooks; the plain pass over the sums must agree."""
    from prune_core.importance.groups import prunable_targets, taylor_group_scores
    from prune_core.importance.prepare import prepared

    model, _ = build_tiny("tiny-qwen2")
    adapter = get_adapter(model)
    parts = adapter.all_parts(model)
    targets = prunable_targets(parts)
    tokens = tokens_for(seed=8, n=4, s=10)
    for aggregation in ("element", "vector"):
        engine = run_importance(
            model,
            adapter,
            tokens,
            method="taylor_2nd",
            aggregation=aggregation,
            batch_size=2,
            hessian_device="cpu",
        )
        with (
            prepared(model, grad_params=[t.param for t in targets], layers=list(adapter.layers(model))),
            GradientAccumulator([(t.key, t.param) for t in targets], second_order=True) as acc,
        ):
            for lo in (0, 2):
                ids = tokens[lo : lo + 2]
                acc.accumulate(model(ids, labels=ids, use_cache=False).loss, weight=2 * 9)
        total, first = taylor_group_scores(parts, targets, acc.sum_grad, acc.sum_sq, acc.batches, aggregation)
        torch.testing.assert_close(total.mlp, engine.mlp, rtol=1e-6, atol=0)
        torch.testing.assert_close(total.attention, engine.attention, rtol=1e-6, atol=0)
        torch.testing.assert_close(first.mlp, engine.first_order["mlp"], rtol=1e-6, atol=0)


def test_already_pruned_model_with_uneven_layers() -> None:
    """Layers of different sizes (after surgery): NaN-padded tables, real group counts in metadata."""
    from prune_core.surgery import apply_pruning

    model, _ = build_tiny("tiny-llama")
    adapter = get_adapter(model)
    apply_pruning(model, adapter, {1: {"attention": [0], "mlp": list(range(64))}})
    for method in ("taylor_2nd", "wanda"):
        r = run_importance(model, adapter, tokens_for(n=2, s=8), method=method, batch_size=2)
        assert r.metadata["attention_groups"] == [2, 1, 2, 2] and r.metadata["mlp_groups"] == [
            128,
            64,
            128,
            128,
        ]
        assert torch.isnan(r.attention[1, 1]) and torch.isnan(r.mlp[1, 64:]).all()
        assert torch.isfinite(r.attention[1, :1]).all() and torch.isfinite(r.mlp[1, :64]).all()
        assert torch.isfinite(r.mlp[[0, 2, 3]]).all()
        assert (
            r.input_sums["down_proj"].shape == (4, 128)
            and torch.isnan(r.input_sums["down_proj"][1, 64:]).all()
        )
        assert r.input_sums["o_proj"].shape == (4, 64) and torch.isnan(r.input_sums["o_proj"][1, 32:]).all()


def test_deferred_mode_through_the_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The accelerator code path (deferred adds, scores after backward) gives the CPU path's scores."""
    import functools

    from prune_core.importance import engine

    model, _ = build_tiny("tiny-qwen2")
    adapter = get_adapter(model)
    tokens = tokens_for(seed=9, n=5, s=10)
    streaming = run_importance(
        model, adapter, tokens, method="taylor_2nd", aggregation="vector", batch_size=2
    )
    monkeypatch.setattr(
        engine, "GradientAccumulator", functools.partial(GradientAccumulator, streaming=False)
    )
    deferred = run_importance(model, adapter, tokens, method="taylor_2nd", aggregation="vector", batch_size=2)
    assert torch.equal(streaming.attention, deferred.attention) and torch.equal(streaming.mlp, deferred.mlp)
    assert streaming.batch_stats == deferred.batch_stats


def test_magnitude_matches_brute_force(model64: torch.nn.Module) -> None:
    """magnitude = sqrt(Σ w²) over every parameter of the group (weights and q/k/v/gate/up biases),
    data-free: no forward pass, 0 batches / tokens, statistics of the weights themselves."""
    params = scored_params(model64)
    values = {k: p.detach() for k, p in params.items()}
    cfg = model64.config
    forwards: list[int] = []
    handle = model64.register_forward_pre_hook(lambda mod, args: forwards.append(1))
    try:
        result = run_importance(
            model64, get_adapter(model64), torch.zeros(0, S, dtype=torch.long), method="magnitude", batch_size=BS
        )
    finally:
        handle.remove()
    assert forwards == []
    for block, groups in (("attention", cfg.num_key_value_heads), ("mlp", cfg.intermediate_size)):
        want = torch.zeros(cfg.num_hidden_layers, groups, dtype=torch.float64)
        for layer in range(cfg.num_hidden_layers):
            for g in range(groups):
                want[layer, g] = sum((p**2).sum() for p in group_pieces(model64, values, layer, block, g)).sqrt()
        got = getattr(result, block)
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0, msg=f"{cfg.model_type} {block}")
    assert (result.method, result.stats_label, result.first_order) == ("magnitude", "weight", None)
    assert (result.batches, result.tokens, result.input_tokens, result.batch_stats) == (0, 0, 0, [])
    assert result.input_sums["o_proj"].shape == (cfg.num_hidden_layers, cfg.hidden_size)
    assert not result.input_sums["down_proj"].any()
    # statistics: of the scored parameters of each block, per layer
    for layer in range(cfg.num_hidden_layers):
        for block, names in (("attention", LINEARS[:4]), ("mlp", LINEARS[4:])):
            want_stats = _block_stats([v for k, v in values.items() if k[0] == layer and k[1] in names])
            for stat, value in want_stats.items():
                assert result.stats[block][stat][layer] == pytest.approx(value, rel=1e-9), (block, stat)


def test_magnitude_result_round_trip_and_notices(tmp_path) -> None:
    model, _ = build_tiny("tiny-qwen2")
    events: list[Any] = []
    r = run_importance(model, get_adapter(model), tokens_for(n=2), method="magnitude", aggregation="vector",
                       batch_size=1, gradient_checkpointing=True, on_event=events.append)
    kinds = [type(e).__name__ for e in events]
    assert "StageStarted" in kinds and kinds[-1] == "StageDone" and "BatchDone" not in kinds
    assert r.aggregation == "element" and sum(k == "Notice" for k in kinds) == 2
    r.save(tmp_path)
    back = ImportanceResult.load(tmp_path)
    assert torch.equal(back.attention, r.attention) and back.stats == r.stats and back.stats_label == "weight"
