"""Fuzz (hypothesis, bounded examples): generated session files and damaged results folders.

Sessions through `prune validate`: exit 0 or 2, never a traceback, nothing written. Damaged folders
through `prune show` / `compare` / `fix`: exit 0, 1 or 2, never a traceback, the folder unchanged.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from prune_core import pipeline, report
from tests.helpers import tiny_session

runner = CliRunner()
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

KEYS = {
    "session": ["name", "seed", "output_dir"],
    "model": ["id", "dtype", "device", "trust_remote_code"],
    "data": ["dataset", "num_samples", "seq_len", "batch_size", "proxy_samples"],
    "importance": ["method", "checkpoint_seconds", "gradient_checkpointing"],
    "correction": ["temperature", "tau", "samples", "seq_len"],
    "normalization": ["level", "method", "clip"],
    "pruning": ["ratio", "min_rate", "max_rate", "protect_layers", "early_layers", "depth_weight",
                "attention_weight", "compensate", "ridge"],
    "evaluation": ["dataset", "seq_len", "max_tokens", "before", "after"],
    "output": ["save_model"],
    "bogus": ["key"],
}
TEXT = st.one_of(st.text(alphabet=st.sampled_from(list("ab.-_[]/\\\n\t\x1b\u00e9 01")), max_size=12),
                 st.sampled_from(["nope[/]", "x[bold]y", "./corpus[/]v2.txt"]))
SCALAR = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), TEXT, st.sampled_from(["tiny-llama", "shakespeare", "taylor", "cpu", "cuda", "log", "none", "yes"]),
)
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=3))


def _toml_value(v: object) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v)
    return json.dumps(v)  # a TOML basic string is a JSON string


@st.composite
def session_texts(draw: st.DrawFn) -> str:
    lines = ['[model]', 'id = "tiny-llama"', 'device = "cpu"']
    for section in draw(st.lists(st.sampled_from(sorted(KEYS)), max_size=4, unique=True)):
        keys = draw(st.lists(st.sampled_from(KEYS[section]), min_size=1, max_size=3, unique=True))
        lines.append(f"[{section}]" if section != "model" else "[model.extra]")
        lines += [f"{k} = {_toml_value(draw(VALUE))}" for k in keys]
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):  # sometimes break the TOML itself
        cut = draw(st.integers(min_value=0, max_value=len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "[", "\ufeff", "= =", "\x00", "[[a]]"])) + text[cut:]
    return text


@FUZZ
@given(text=session_texts())
def test_generated_sessions_exit_0_or_2_and_write_nothing(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "s.toml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        r = runner.invoke(app, ["validate", str(path)])
        out = r.stdout + r.stderr
        assert r.exit_code in (0, 2), out
        assert "Traceback" not in out, out
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        assert sorted(p.name for p in folder.iterdir()) == ["s.toml"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzz")
    session = tiny_session(tmp, name="a", **{"evaluation.before": False, "evaluation.after": False,
                                              "data.proxy_samples": 0, "output.save_model": False})
    pipeline.run(session, out_dir=tmp / "k")
    return tmp / "k"


FILES = ["session.toml", "metrics.json", "manifest.json", "analysis/global_group_table.csv",
         "analysis/pruning_summary_by_layer.csv", "analysis/gradient_statistics.json",
         "analysis/gradient_diagnosis.json"]
JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.sampled_from(
                                                   ["ratio", "target", "diagnosis", "fix", "parameters", "ppl",
                                                    "perplexity", "blocks", "files", "mask_sha256", "x"]),
                                                   inner, max_size=3)), max_leaves=8)


@st.composite
def damage(draw: st.DrawFn) -> tuple[str, str, bytes]:
    rel = draw(st.sampled_from(FILES))
    how = draw(st.sampled_from(["bytes", "json", "truncate", "delete", "csv"]))
    if how == "bytes":
        data = draw(st.binary(max_size=64))
    elif how == "json":
        data = json.dumps(draw(JSONISH)).encode()
    elif how == "csv":
        data = draw(st.sampled_from([b"layer_idx,attention_rate,mlp_rate\n1,x,2\n", b"a\n", b"",
                                     b"layer_idx,group_type,group_idx,pruned\n0,mlp,1,maybe\n"]))
    else:
        data = b""
    return rel, how, data


@FUZZ
@given(cases=st.lists(damage(), min_size=1, max_size=3), command=st.sampled_from(["show", "compare", "fix"]))
def test_damaged_folders_exit_cleanly(finished: Path, cases: list[tuple[str, str, bytes]], command: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        k = Path(tmp) / "k"
        shutil.copytree(finished, k)
        for rel, how, data in cases:
            path = k / rel
            if how == "delete":
                path.unlink(missing_ok=True)
            elif how == "truncate" and path.is_file():
                path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
            else:
                path.write_bytes(data)
        before = {p.relative_to(k).as_posix(): p.read_bytes() for p in k.rglob("*") if p.is_file()}
        args = [command, str(k)] + ([str(finished)] if command == "compare" else [])
        r = runner.invoke(app, args)
        out = r.stdout + r.stderr
        assert r.exit_code in (0, 1, 2), out
        assert "Traceback" not in out, out
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        after = {p.relative_to(k).as_posix(): p.read_bytes() for p in k.rglob("*") if p.is_file()}
        assert after == before
        assert not (k / report.PREVIOUS).exists()
