"""`prune export --format hf`: uniform pruning → a plain Hugging Face folder with the same logits;
non-uniform, removed blocks, inexpressible compensation biases → exit 2 with what differs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from cli.main import app
from prune_core.adapters import get_adapter
from prune_core.export import load_pruned, save_pruned
from prune_core.hf_export import MARKER, uniformity_problems
from prune_core.surgery import apply_pruning
from prune_core.tiny import build_tiny

runner = CliRunner()


def invoke(*args: str) -> tuple[int, str, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def pruned_folder(folder: Path, key: str, prune: dict, *, compensate: bool = False) -> Path:
    model, tok = build_tiny(key)
    means = None
    if compensate:
        g = torch.Generator().manual_seed(7)
        means = {"o_proj": torch.randn(4, 64, generator=g), "down_proj": torch.randn(4, 128, generator=g)}
    report = apply_pruning(model, get_adapter(model), prune, input_means=means)
    return save_pruned(model, tok, folder, kept=report.kept, source={"spec": key}, session={})


# the same number of KV heads (1 of 2) and MLP channels (96 of 128) in every layer, different ones each
UNIFORM = {i: {"attention": [i % 2], "mlp": list(range(i, 128, 4))} for i in range(4)}
UNEVEN = {0: {"attention": [0], "mlp": list(range(40))}, 1: {"mlp": list(range(40))}, 3: {"attention": [1]}}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("key", "compensate"), [("tiny-llama", True), ("tiny-qwen2", False), ("tiny-mistral", False)])
def test_uniform_export_loads_with_from_pretrained(tmp_path: Path, key: str, compensate: bool) -> None:
    src = pruned_folder(tmp_path / "model", key, UNIFORM, compensate=compensate)
    out = tmp_path / "hf"
    code, stdout, err = invoke("export", str(src), "--format", "hf", "--out", str(out), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["sizes"] == {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                             "intermediate_size": 96}
    assert info["verified"] and info["max_abs_logit_diff"] == 0.0

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MARKER} <= names
    assert "pruning.json" not in names  # a plain folder: prune's own loader must not mistake it for a recipe
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pth", ".tmp"))]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    config = json.loads((out / "config.json").read_text())
    assert (config["num_key_value_heads"], config["intermediate_size"], config["head_dim"]) == (1, 96, 16)
    assert config.get("mlp_bias", False) is compensate and config.get("attention_bias", False) is compensate

    ours, tok = load_pruned(src)
    plain = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(plain, ids), logits(ours, ids))
    assert sum(p.numel() for p in plain.parameters()) == info["parameters"]
    plain_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert plain_tok("To be, or not").input_ids == tok("To be, or not").input_ids
    if compensate:  # the zero-filled biases are exactly zero; the compensation biases are not
        layer = plain.model.layers[0]
        assert torch.count_nonzero(layer.self_attn.q_proj.bias) == 0 and torch.count_nonzero(layer.mlp.up_proj.bias) == 0
        assert torch.count_nonzero(layer.self_attn.o_proj.bias) > 0 and torch.count_nonzero(layer.mlp.down_proj.bias) > 0


def test_export_runs_without_our_package(tmp_path: Path) -> None:
    src = pruned_folder(tmp_path / "model", "tiny-llama", UNIFORM, compensate=True)
    out = tmp_path / "hf"
    assert invoke("export", str(src), "--out", str(out), "--no-verify")[0] == 0
    script = textwrap.dedent(f"""
        import json, sys
        for name in ("prune_core", "cli", "sessions", "tui"):
            sys.modules[name] = None  # any import of our package fails
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, local_files_only=True).eval()
        ids = torch.tensor([[5, 80, 97, 32, 200, 13, 101, 256]])
        with torch.no_grad():
            print(json.dumps(model(ids).logits[0, -1].tolist()))
            print(json.dumps(model.generate(ids, max_new_tokens=4, do_sample=False)[0].tolist()))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    last, generated = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    ours, _ = load_pruned(src)
    ids = torch.tensor([[5, 80, 97, 32, 200, 13, 101, 256]])
    assert last == logits(ours, ids)[0, -1].tolist()
    assert generated == ours.generate(ids, max_new_tokens=4, do_sample=False)[0].tolist()


def test_non_uniform_is_refused_with_the_layers_that_differ(tmp_path: Path) -> None:
    src = pruned_folder(tmp_path / "model", "tiny-llama", UNEVEN)
    out = tmp_path / "hf"
    code, stdout, err = invoke("export", str(src), "--format", "hf", "--out", str(out))
    text = " ".join(err.split())
    assert code == 2 and stdout == ""
    assert "KV heads per layer differ: 2 in layers 1-2; 1 in layers 0, 3" in text
    assert "MLP channels per layer differ: 128 in layers 2-3; 88 in layers 0-1" in text
    assert "load_pruned" in text
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_removed_blocks_and_inexpressible_biases_are_refused(tmp_path: Path) -> None:
    removed = pruned_folder(tmp_path / "removed", "tiny-llama",
                            {i: {"attention": [0, 1] if i == 2 else [], "mlp": []} for i in range(4)})
    code, _, err = invoke("export", str(removed), "--out", str(tmp_path / "a"))
    assert code == 2 and "the attention block is removed in layer 2" in " ".join(err.split())

    qwen = pruned_folder(tmp_path / "qwen", "tiny-qwen2", UNIFORM, compensate=True)
    code, _, err = invoke("export", str(qwen), "--out", str(tmp_path / "b"))
    text = " ".join(err.split())
    assert code == 2 and "does not fit a plain Qwen2Config" in text and "o_proj.bias" in text
    assert "compensate = \"none\"" in text
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_results_folder_targets_and_formats(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "session.toml").write_text("# stand-in\n")
    (results / "metrics.json").write_text("{}\n")
    pruned_folder(results / "model", "tiny-llama", UNIFORM)
    out = tmp_path / "hf"
    code, stdout, err = invoke("export", str(results), "--out", str(out))
    assert code == 0, err
    assert f"wrote {out}: LlamaForCausalLM" in stdout and "from_pretrained" in stdout
    assert json.loads((out / MARKER).read_text())["source"] == str((results / "model").resolve())
    assert invoke("export", str(results), "--out", str(out))[0] == 0  # an earlier export is replaced

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, _, err = invoke("export", str(results), "--out", str(precious))
    assert code == 2 and "is not an earlier export" in err and (precious / "notes.txt").read_text() == "keep me"

    assert invoke("export", str(results), "--format", "gguf", "--out", str(tmp_path / "g.gguf"), "--no-verify")[0] == 0
    assert (tmp_path / "g.gguf").is_file()
    assert invoke("export", str(results), "--format", "onnx", "--out", str(tmp_path / "g"))[0] == 2
    assert invoke("export", str(results))[0] == 2  # --out is required
    code, _, err = invoke("export", str(tmp_path / "precious"), "--out", str(tmp_path / "g"))
    assert code == 2 and "neither a results folder nor a saved pruned model" in err
    (results / "model" / "pruning.json").unlink()
    assert invoke("export", str(results), "--out", str(tmp_path / "g"))[0] == 2
    assert not (tmp_path / "g").exists()


def test_uniformity_problem_wording() -> None:
    def layer(i: int, kv: int, mlp: int) -> dict:
        return {"layer": i, "attention": {"kept": list(range(kv)), "removed": kv == 0, "original": 2},
                "mlp": {"kept": list(range(mlp)), "removed": mlp == 0, "original": 8}}

    assert uniformity_problems({"layers": [layer(i, 1, 6) for i in range(5)]}) == []
    recipe = {"layers": [layer(0, 2, 8), layer(1, 1, 8), layer(2, 1, 0), layer(3, 1, 8), layer(4, 0, 4)]}
    assert uniformity_problems(recipe) == [
        "the attention block is removed in layer 4",
        "the MLP block is removed in layer 2",
        "KV heads per layer differ: 1 in layers 1-3; 2 in layer 0",
        "MLP channels per layer differ: 8 in layers 0-1, 3; 4 in layer 4",
    ]
