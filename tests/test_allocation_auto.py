"""`[pruning] allocation = "auto"`: the global ranking below AUTO_GLOBAL_BELOW, the uniform MLP budget from there.

The rule comes from held-out measurements (BENCHMARKS.md, ninth screening); these tests pin what it does to
a mask, so a session that says "auto" gets exactly the budget the README promises at its ratio.
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from prune_core.allocation import GroupCosts, allocate
from sessions.schema import AUTO_GLOBAL_BELOW, Session


def scores(layers: int = 6, heads: int = 3, channels: int = 24, seed: int = 0) -> object:
    g = torch.Generator().manual_seed(seed)
    return type("R", (), {"attention": torch.rand(layers, heads, generator=g, dtype=torch.float64) * 3.0,
                          "mlp": torch.rand(layers, channels, generator=g, dtype=torch.float64)})()


COSTS = GroupCosts.from_lists([10] * 6, [40] * 6, [3] * 6, [24] * 6)  # MLP: 97 % of the prunable parameters


def session(**pruning: object) -> Session:
    return Session.model_validate({"pruning": {"protect_layers": [0, -1], **pruning}})


@pytest.mark.parametrize("ratio", [0.1, 0.2, AUTO_GLOBAL_BELOW - 0.01])
def test_below_the_threshold_auto_is_the_global_ranking_over_the_chosen_blocks(ratio: float) -> None:
    res = scores()
    for blocks in ("both", "mlp"):
        auto = allocate(res, COSTS, session(ratio=ratio, blocks=blocks, allocation="auto"))
        glob = allocate(res, COSTS, session(ratio=ratio, blocks=blocks, allocation="global"))
        assert auto.mask_sha256 == glob.mask_sha256
        assert session(ratio=ratio, blocks=blocks, allocation="auto").pruning.budget() == (blocks, "global")


@pytest.mark.parametrize("ratio", [AUTO_GLOBAL_BELOW, 0.4, 0.6])
def test_from_the_threshold_auto_is_one_mlp_rate_and_keeps_every_head(ratio: float) -> None:
    res = scores()
    auto = allocate(res, COSTS, session(ratio=ratio, blocks="both", allocation="auto"))
    uniform_mlp = allocate(res, COSTS, session(ratio=ratio, blocks="mlp", allocation="uniform"))
    assert auto.mask_sha256 == uniform_mlp.mask_sha256
    table = auto.table
    assert not table.loc[table["group_type"] == "attention", "pruned"].any()  # attention heads all kept
    per_layer = table[table["group_type"] == "mlp"].groupby("layer_idx")["pruned"].sum().to_numpy()
    assert per_layer[0] == per_layer[-1] == 0 and len(set(per_layer[1:-1].tolist())) == 1  # one rate
    assert auto.achieved_ratio >= ratio
    # blocks = "attention" stays attention: auto only decides how the budget is spread
    assert session(ratio=ratio, blocks="attention", allocation="auto").pruning.budget() == ("attention", "uniform")


def test_auto_refuses_the_knobs_of_one_budget_only() -> None:
    with pytest.raises(ValidationError, match="depth_ramp"):
        session(allocation="auto", depth_ramp=0.25)
    with pytest.raises(ValidationError, match="global_share"):
        session(allocation="auto", global_share=0.5)


def test_the_recommended_session_prunes_heads_only_at_light_ratios() -> None:
    from sessions.presets import recommended

    light = recommended().with_updates({"pruning.ratio": 0.2}).pruning
    heavy = recommended().with_updates({"pruning.ratio": 0.4}).pruning
    assert light.budget() == ("both", "global")
    assert heavy.budget() == ("mlp", "uniform")
