"""Session files: schema defaults, round trip, comment-preserving saves, every validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sessions
from sessions import Session, SessionError, check_against_model


def problems_of(text: str) -> dict[str, str]:
    with pytest.raises(SessionError) as info:
        sessions.parse_text(text)
    return dict(info.value.problems)


def test_defaults_match_the_spec() -> None:
    s = Session()
    assert s.schema_version == 1
    assert (s.session.seed, s.session.output_dir) == (0, "runs")
    assert (s.model.id, s.model.revision, s.model.dtype, s.model.device) == ("smollm2-135m", "", "float32", "auto")
    assert s.model.trust_remote_code is False
    assert (s.data.dataset, s.data.num_samples, s.data.seq_len, s.data.batch_size) == ("shakespeare", 32, 128, 4)
    assert (s.importance.method, s.importance.aggregation, s.importance.fisher_scale) == ("taylor", "element", "tokens")
    assert (s.correction.temperature, s.correction.tau, s.correction.samples, s.correction.seq_len) == (0, 0, 8, 128)
    assert (s.normalization.level, s.normalization.method, s.normalization.clip) == ("none", "log", [])
    p = s.pruning
    assert (p.ratio, p.min_rate, p.max_rate, p.protect_layers, p.early_layers, p.early_max_rate,
            p.depth_weight, p.compensate) == (0.2, 0.0, 1.0, [], 0, 1.0, 0.0, "none")
    e = s.evaluation
    assert (e.dataset, e.seq_len, e.max_tokens, e.before, e.after) == ("", 512, 32768, True, True)
    assert s.eval_dataset == "shakespeare" and s.resolved().evaluation.dataset == "shakespeare"
    assert (s.diagnosis.extreme_rate, s.diagnosis.scale_ratio_warn, s.diagnosis.early_layers) == (0.9, 100.0, 5)
    assert s.output.save_model is True
    assert sessions.parse_text("") == s


sessions_strategy = st.builds(
    lambda ratio, lo, hi, method, level, clip, protect, bs, extra, name, dtype, device: Session().with_updates({
        "pruning.ratio": ratio, "pruning.min_rate": min(lo, hi), "pruning.max_rate": max(lo, hi),
        "importance.method": method, "normalization.level": level, "normalization.clip": clip,
        "pruning.protect_layers": protect, "data.batch_size": bs, "data.num_samples": bs + extra,
        "session.name": name, "model.dtype": dtype, "model.device": device,
    }),
    st.floats(0.01, 0.99), st.floats(0, 1), st.floats(0, 1),
    st.sampled_from(["taylor", "taylor_2nd", "wanda", "magnitude"]), st.sampled_from(["none", "layer", "block"]),
    st.sampled_from([[], [1.0, 99.0], [5.0, 95.5]]), st.lists(st.integers(0, 80), max_size=5),
    st.integers(1, 16), st.integers(0, 64), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,12}", fullmatch=True),
    st.sampled_from(["float32", "bfloat16", "float16"]), st.sampled_from(["auto", "cpu", "cuda", "cuda:3", "mps"]),
)


@settings(max_examples=60, deadline=None)
@given(sessions_strategy)
def test_round_trip(session: Session) -> None:
    assert sessions.parse_text(sessions.dumps(session)) == session


def test_save_is_atomic_round_trips_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("# my notes\n[pruning]\n# keep this\nratio = 0.3 # thirty percent\n")
    s = sessions.load(path)
    s2 = s.with_updates({"pruning.ratio": 0.4, "normalization.level": "block"})
    sessions.save(s2, path)
    text = path.read_text()
    assert "# my notes" in text and "# keep this" in text and "# thirty percent" in text
    assert "ratio = 0.4" in text
    assert sessions.load(path) == s2
    assert not [p for p in tmp_path.iterdir() if p.name != "s.toml"], "no temp files left"


def test_save_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.toml"
    sessions.save(Session(), path)
    before = path.read_text()

    def boom(*a: object, **k: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        sessions.save(Session().with_updates({"pruning.ratio": 0.5}), path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.toml"]


@pytest.mark.parametrize(
    ("text", "path", "needle"),
    [
        ("[pruning]\nrato = 0.2", "pruning.rato", "unknown key (allowed: ratio"),
        ("[prunning]\nratio = 0.2", "prunning", "unknown key"),
        ("[pruning]\nratio = 'high'", "pruning.ratio", "valid number"),
        ("[pruning]\nratio = 0.0", "pruning.ratio", "greater than 0"),
        ("[pruning]\nratio = 1.0", "pruning.ratio", "less than 1"),
        ("[pruning]\nmin_rate = 0.6\nmax_rate = 0.4", "pruning.min_rate", "must not exceed max_rate"),
        ("[data]\nnum_samples = 4\nbatch_size = 8", "data.batch_size", "must not exceed num_samples"),
        ("[importance]\nmethod = 'obs'", "importance.method", "'taylor', 'taylor_2nd', 'wanda' or 'magnitude'"),
        ("[model]\ndtype = 'int8'", "model.dtype", "'float32', 'bfloat16' or 'float16'"),
        ("[model]\ndevice = 'gpu'", "model.device", "auto, cpu, cuda, cuda:N or mps"),
        ("[normalization]\nclip = [90, 10]", "normalization.clip", "0 <= low < high <= 100"),
        ("[pruning]\nprotect_layers = [-5000]", "pruning.protect_layers", "count from the end"),
        ("[session]\nname = 'has space'", "session.name", "folder name"),
        ("schema_version = 2", "schema_version", "less than or equal to 1"),
        ("pruning = 3", "pruning", "must be a table"),
        ("[pruning]\nglobal_share = 0.5", "pruning", "set allocation = \"uniform\", or global_share = 0"),
        ("[pruning]\ndepth_ramp = 0.5", "pruning", "set allocation = \"uniform\" or \"hybrid\""),
    ],
)
def test_each_validation_error_names_key_and_allowed_values(text: str, path: str, needle: str) -> None:
    problems = problems_of(text)
    assert path in problems, problems
    assert needle in problems[path]


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of("[pruning]\nratio = 2\nmin_rate = 0.9\nmax_rate = 0.1\nbogus = 1\n"
                           "[data]\nnum_samples = 1\nbatch_size = 2\n[importance]\nmethod = 'x'\n")
    assert set(problems) == {"pruning.ratio", "pruning.min_rate", "pruning.bogus", "data.batch_size",
                             "importance.method"}


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    assert "invalid TOML" in problems_of("[pruning\n")["(toml)"]
    with pytest.raises(sessions.SessionError.__mro__[1], match="does not exist"):
        sessions.load(tmp_path / "nope.toml")


def test_protect_layers_checked_against_the_model() -> None:
    s = Session().with_updates({"pruning.protect_layers": [0, 3, 30], "pruning.early_layers": 40})
    problems = dict(check_against_model(s, num_layers=30))
    assert "layers [30] do not exist" in problems["pruning.protect_layers"]
    assert "pruning.early_layers" in problems
    assert check_against_model(Session(), 30) == []
    everything = Session().with_updates({"pruning.protect_layers": [-1, 0, 1, 2]})  # -1 is layer 3
    assert "every one of the model's 4 layers is protected" in dict(check_against_model(everything, 4))[
        "pruning.protect_layers"]
    assert check_against_model(everything, 5) == []


def test_template_has_every_key_and_validates() -> None:
    text = sessions.template_text()
    for section, cls in sessions.schema.SECTIONS.items():
        assert f"[{section}]" in text
        for key in cls.model_fields:
            assert f"\n{key} = " in text, f"{section}.{key}"
    from sessions.presets import recommended

    assert sessions.parse_text(text) == recommended()  # `prune new` writes the recommended configuration
    assert "schema default" in text  # and names the plain default of each key it changes
    assert sessions.parse_text(sessions.template_text(Session())) == Session()


def test_the_quick_start_runs_the_recommended_configuration() -> None:
    """README: the quick start uses the recommended configuration (sessions/presets.py)."""
    from sessions.presets import RECOMMENDED

    quick = sessions.load(Path(__file__).resolve().parent.parent / "examples" / "quickstart.toml")
    assert quick.with_updates(RECOMMENDED) == quick
    assert quick.pruning.ratio == 0.2 and quick.pruning.budget() == ("both", "global")
