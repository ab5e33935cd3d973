"""The importance-method registry: one place lists the methods; the schema, TUI lists, estimate,
engine and diagnosis read it; importing it does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from prune_core.errors import BadInput
from prune_core.importance.registry import METHODS, MethodSpec, get_method, method_keys, stats_noun
from sessions import Session, SessionError


def test_registry_lists_every_method_once_with_its_needs() -> None:
    assert method_keys() == ("taylor", "taylor_2nd", "wanda", "magnitude")
    for key, spec in METHODS.items():
        assert isinstance(spec, MethodSpec) and spec.key == key and spec.label and spec.description
        assert spec.stats_label in ("gradient", "activation", "weight")
        assert callable(spec.score) and (spec.partial is not None) == spec.needs_gradients
    needs = {k: (s.needs_gradients, s.needs_calibration, s.needs_fisher) for k, s in METHODS.items()}
    assert needs == {"taylor": (True, True, False), "taylor_2nd": (True, True, True),
                     "wanda": (False, True, False), "magnitude": (False, False, False)}
    assert {k: s.stats_label for k, s in METHODS.items()} == {
        "taylor": "gradient", "taylor_2nd": "gradient", "wanda": "activation", "magnitude": "weight"}
    assert stats_noun("activation") == "activation norm" and stats_noun("weight") == "weight"
    assert get_method("taylor_2nd").cheaper == "taylor"


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(BadInput) as info:
        get_method("obs")
    for key in method_keys():
        assert key in str(info.value)
    with pytest.raises(SessionError) as err:
        Session().with_updates({"importance.method": "obs"})
    assert all(key in str(err.value) for key in method_keys())
    for key in method_keys():
        assert Session().with_updates({"importance.method": key}).importance.method == key


def test_registry_and_sessions_import_without_torch() -> None:
    code = ("import sys, sessions; from prune_core.importance.registry import METHODS; "
            "from sessions import template_text; text = template_text(); "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert all(k in text for k in METHODS), text")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_estimate_reads_the_registry() -> None:
    from tui.estimate import Geometry, estimate

    geo = Geometry.guess(135_000_000)
    kw = {"seq_len": 128, "num_samples": 32, "batch_size": 4}
    taylor, second, wanda, magnitude = (estimate(geo, method=m, **kw) for m in method_keys())
    assert second.memory_bytes - taylor.memory_bytes == geo.prunable * 4  # the Fisher diagonal
    assert wanda.flops < taylor.flops and wanda.memory_bytes < taylor.memory_bytes
    assert magnitude.tokens == 0 and magnitude.flops < wanda.flops and magnitude.memory_bytes < wanda.memory_bytes


def test_tui_method_list_is_the_registry() -> None:
    from tui.screens.steps_options import METHODS as TUI_METHODS

    assert [k for k, _ in TUI_METHODS] == list(method_keys())


def test_diagnosis_names_statistics_and_fix_from_the_registry() -> None:
    from prune_core.diagnosis import diagnose

    stats = {b: {s: [0.0, 1.0] for s in ("mean", "std", "norm", "max", "min")} for b in ("attention", "mlp", "layer")}
    found = diagnose(stats=stats, stats_label="weight", summary=None, session=Session())
    zero = next(f for f in found if f.issue == "zero_weight")
    assert "weight statistics" in zero.description
    s2 = Session().with_updates({"importance.method": "taylor_2nd"})
    f2 = next(f for f in diagnose(stats={}, stats_label="gradient", summary=None, session=s2,
                                  second_order_share=1e-6) if f.issue == "second_order_negligible")
    assert f2.fix == {"importance.method": "taylor"}
