"""`prune eval --tasks`: lm-eval task accuracy of a saved pruned model, offline fail-fast, results files.

The local task tests/fixtures/lm_eval_tasks/prune_tiny_mc.yaml (12 multiple-choice questions in a
jsonl next to it, loaded with lm-eval's `dataset_path: json`) runs on tiny-llama pruned to uneven
widths: the CLI must give exactly lm-eval's own numbers for the same model, and those numbers must be
the argmax of the model's log-likelihoods computed here by hand.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from prune_core import zeroshot
from prune_core.adapters import get_adapter
from prune_core.errors import BadInput
from prune_core.export import load_pruned, save_pruned
from prune_core.surgery import apply_pruning
from prune_core.tiny import build_tiny

REPO = Path(__file__).resolve().parents[1]
TASKS = Path("tests/fixtures/lm_eval_tasks")  # relative: the YAML's data_files are relative to the repo root
TASK = "prune_tiny_mc"
runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder (session.toml + metrics.json) whose model/ is tiny-llama with uneven layers."""
    root = tmp_path_factory.mktemp("zs") / "results"
    root.mkdir()
    (root / "session.toml").write_text("# stand-in\n")
    (root / "metrics.json").write_text("{}\n")
    model, tok = build_tiny("tiny-llama")
    g = torch.Generator().manual_seed(3)
    means = {"o_proj": torch.randn(4, 64, generator=g), "down_proj": torch.randn(4, 128, generator=g)}
    report = apply_pruning(model, get_adapter(model), {0: {"mlp": list(range(0, 128, 3))}, 1: {"attention": [1]},
                                                       2: {"mlp": list(range(50))}}, input_means=means)
    save_pruned(model, tok, root / "model", kept=report.kept, source={"spec": "tiny-llama"}, session={})
    return root


def _by_hand(model_dir: Path) -> tuple[float, float]:
    """acc and acc_norm of the fixture task from the model's own log-likelihoods (lm-eval's definitions:
    argmax of the summed log-probability of " " + choice after the prompt; acc_norm divides by the
    choice's length in characters)."""
    model, tok = load_pruned(model_dir)
    docs = [json.loads(line) for line in (REPO / TASKS / f"{TASK}.jsonl").read_text().splitlines() if line]
    hits = hits_norm = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        ctx = tok(context, add_special_tokens=False).input_ids
        scores = []
        for choice in doc["choices"]:
            cont = tok(context + " " + choice, add_special_tokens=False).input_ids[len(ctx):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
        norm = [s / len(c) for s, c in zip(scores, doc["choices"], strict=True)]
        hits_norm += int(max(range(len(norm)), key=norm.__getitem__) == doc["answer"])
    return hits / len(docs), hits_norm / len(docs)


def test_cli_gives_lm_evals_own_accuracy(results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(REPO)
    model_dir = results / "model"
    out_file = tmp_path / "zs.json"
    code, out, err = invoke("eval", str(model_dir), "--tasks", TASK, "--include-path", str(TASKS),
                            "--device", "cpu", "--batch-size", "3", "--out", str(out_file), "--json")
    assert code == 0, err
    got = json.loads(out)
    entry = got["tasks"][TASK]

    model, tok = load_pruned(model_dir)
    direct = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=3), tasks=[TASK],
                                     task_manager=TaskManager(include_path=str(TASKS)))
    want = direct["results"][TASK]
    for key in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert entry["metrics"][key] == want[key], key
    assert (entry["metrics"]["acc,none"], entry["metrics"]["acc_norm,none"]) == pytest.approx(_by_hand(model_dir))

    assert entry["samples"] == {"evaluated": 12, "total": 12} and entry["n_shot"] == 0 and entry["version"] == 1.0
    assert entry["task_hash"] == zeroshot.task_hash(direct["samples"][TASK])
    assert len(entry["config_sha256"]) == 64
    assert got["lm_eval_version"] == lm_eval.__version__ == entry["lm_eval_version"]
    assert got["settings"]["batch_size"] == 3 and got["settings"]["data"] == "local cache"

    # written atomically to --out and, since the model sits in a results folder, to <results>/zeroshot.json
    assert got["written"] == [str(results / zeroshot.RESULTS_FILE), str(out_file)]
    for path in (out_file, results / zeroshot.RESULTS_FILE):
        saved = json.loads(path.read_text())
        assert saved["tasks"][TASK]["metrics"] == entry["metrics"]
        assert saved["weights_sha256"] == got["weights_sha256"]
    assert not [p for p in results.iterdir() if p.name.endswith(".tmp")]

    # the human table, with few-shot and a limit: 2 of 12 samples
    code, out, err = invoke("eval", str(model_dir), "--tasks", TASK, "--include-path", str(TASKS),
                            "--device", "cpu", "--limit", "2", "--num-fewshot", "1")
    assert code == 0, err
    assert TASK in out and "acc_norm" in out and "2/12" in out
    kept = json.loads((results / zeroshot.RESULTS_FILE).read_text())["tasks"][TASK]
    assert kept["samples"]["evaluated"] == 2 and kept["n_shot"] == 1  # the latest run of a task wins


def test_uncached_hub_task_fails_fast_before_the_model(results: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config as ds_config
    import huggingface_hub.constants as hub_constants

    # an empty cache, whatever this machine has downloaded; offline as on an air-gapped machine
    monkeypatch.setattr(ds_config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    # a model folder without weights: reaching the model would fail with another message
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(results / "model" / "pruning.json", bare / "pruning.json")
    shutil.copy(results / "model" / "config.json", bare / "config.json")

    code, out, err = invoke("eval", str(bare), "--tasks", f"arc_easy,{TASK}", "--include-path", str(TASKS))
    assert code == 2 and out == ""
    text = " ".join(err.split())
    assert "'arc_easy' (data set allenai/ai2_arc)" in text and TASK not in text.split("Fix:")[0]
    assert "not in the local Hugging Face datasets cache and offline mode is on" in text
    assert "HF_DATASETS_OFFLINE" in text and "--include-path" in text and "TaskManager().load(['arc_easy'])" in text
    assert "model.safetensors" not in text

    # not offline by the environment, but the Hub does not answer the probe: the same fail-fast
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    probed: list[str] = []
    monkeypatch.setattr(zeroshot, "_hub_reachable", lambda repo: probed.append(repo) or False)
    code, _, err = invoke("eval", str(bare), "--tasks", "arc_easy")
    assert code == 2 and probed == ["allenai/ai2_arc"]
    assert "'arc_easy' (data set allenai/ai2_arc) is not in the local Hugging Face datasets cache and the Hugging " \
           "Face Hub" in " ".join(err.split()) and "is unreachable" in err

    code, _, err = invoke("eval", str(bare), "--tasks", "prune_tiny_m", "--include-path", str(TASKS))
    assert code == 2 and "unknown task 'prune_tiny_m'" in err and TASK in err


def test_local_task_with_missing_data_file(tmp_path: Path, results: Path) -> None:
    folder = tmp_path / "tasks"
    folder.mkdir()
    yaml = (REPO / TASKS / f"{TASK}.yaml").read_text().replace(f"task: {TASK}", "task: prune_lost_mc")
    (folder / "lost.yaml").write_text(yaml.replace("tests/fixtures/lm_eval_tasks/", str(tmp_path / "nowhere") + "/"))
    code, _, err = invoke("eval", str(results / "model"), "--tasks", "prune_lost_mc", "--include-path", str(folder))
    assert code == 2 and "task 'prune_lost_mc': its data cannot be found" in " ".join(err.split())


@pytest.mark.parametrize(("args", "needle"), [
    (["--limit", "5"], "--limit only applies to task evaluation"),
    (["--limit", "5", "--batch-size", "2"], "--limit, --batch-size only apply to task evaluation"),
    (["--tasks", TASK, "--seq-len", "64"], "--seq-len only applies to perplexity"),
    (["--tasks", TASK, "--batch-size", "zero"], "--batch-size 'zero' is not a positive number"),
    (["--tasks", TASK, "--limit", "0"], "--limit 0 is not positive"),
    (["--tasks", TASK, "--limit", "2.5"], "neither a whole number"),
    (["--tasks", TASK, "--num-fewshot", "-1"], "--num-fewshot -1 is negative"),
    (["--tasks", " , "], "--tasks names no task"),
    (["--tasks", TASK, "--include-path", "no/such/folder"], "--include-path no/such/folder does not exist"),
])
def test_bad_arguments_exit_2(results: Path, args: list[str], needle: str) -> None:
    code, out, err = invoke("eval", str(results / "model"), *args)
    assert code == 2 and out == ""
    assert needle in " ".join(err.split())


def test_not_a_model_folder(tmp_path: Path) -> None:
    code, _, err = invoke("eval", str(tmp_path), "--tasks", TASK)
    assert code == 2 and "no pruning.json" in err


def test_missing_lm_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(BadInput) as info:
        zeroshot.require_lm_eval()
    assert f"{sys.executable} -m pip install \"{zeroshot.LM_EVAL_REQUIREMENT}\"" in str(info.value)


def test_results_file_keeps_other_tasks_of_the_same_weights(tmp_path: Path) -> None:
    def summary(sha: str, tasks: dict[str, float]) -> dict:
        return {"format": zeroshot.FORMAT, "weights_sha256": sha, "groups": {},
                "tasks": {name: {"metrics": {"acc,none": acc}} for name, acc in tasks.items()}}

    path = tmp_path / "zeroshot.json"
    zeroshot.write_results(path, summary("a", {"x": 0.1, "y": 0.2}), merge=True)
    zeroshot.write_results(path, summary("a", {"y": 0.3, "z": 0.4}), merge=True)
    doc = json.loads(path.read_text())
    assert {k: v["metrics"]["acc,none"] for k, v in doc["tasks"].items()} == {"x": 0.1, "y": 0.3, "z": 0.4}
    zeroshot.write_results(path, summary("b", {"z": 0.5}), merge=True)  # other weights: the old tasks go
    assert list(json.loads(path.read_text())["tasks"]) == ["z"]
    zeroshot.write_results(path, summary("b", {"w": 0.6}))  # no merge: exactly this run
    assert list(json.loads(path.read_text())["tasks"]) == ["w"]


def test_rows_and_task_hash() -> None:
    summary = {"tasks": {"t": {"metrics": {"acc,none": 0.5, "acc_stderr,none": 0.1, "exact_match,strict": 0.2},
                               "samples": {"evaluated": 4, "total": 8}}},
               "groups": {"g": {"metrics": {"acc,none": 0.7, "acc_stderr,none": "N/A"}}}}
    assert zeroshot.rows(summary) == [("t", "acc", 0.5, 0.1, "4/8"), ("t", "exact_match (strict)", 0.2, None, "4/8"),
                                      ("g", "acc", 0.7, "N/A", "group")]
    samples = [{"doc_hash": "a", "prompt_hash": "b", "target_hash": "c"}, {"doc_hash": "d", "prompt_hash": "e",
                                                                           "target_hash": "f"}]
    import hashlib

    assert zeroshot.task_hash(samples) == hashlib.sha256(b"abcdef").hexdigest()
    assert zeroshot.task_hash([]) == hashlib.sha256(b"").hexdigest()


def test_perplexity_mode_unchanged_and_out_file(results: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"  # outside a results folder: nothing is cached or written next to it
    shutil.copytree(results / "model", model_dir)
    out_file = tmp_path / "ppl.json"
    code, out, err = invoke("eval", str(model_dir), "--seq-len", "32", "--max-tokens", "256", "--device", "cpu",
                            "--out", str(out_file), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert json.loads(out_file.read_text()) == result and 0 < result["tokens"] <= 256 and result["ppl"] > 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "ppl.json"]
