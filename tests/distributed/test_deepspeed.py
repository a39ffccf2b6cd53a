"""DeepSpeed ZeRO-2 and ZeRO-3 through llmtune on 2 CPU processes (gloo, DeepSpeed's CPU accelerator), tiny:llama.

DeepSpeed owns the weights and the optimizer between steps, so what llmtune writes (adapter, checkpoints) must be
gathered from the shards. Three torchrun jobs, started together in one module fixture, on the same recipe:
plain DDP (the reference), ZeRO-2 and ZeRO-3. Checked: each exits 0 with a completed run directory; the ZeRO
adapters equal the DDP adapter (same math, sharded); a ZeRO-3 run resumed with --resume from its step-2
checkpoint (later checkpoints and adapter removed, as after a kill) ends bit-for-bit where the uninterrupted
run ended; merge-adapter and eval work from the ZeRO-3 run directory.

The first run on a machine JIT-compiles DeepSpeed's shm comm op (about 2 minutes on 2 cores; cached after).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

import torch  # noqa: E402
from helpers import chat_rows, free_port, save_recipe, write_jsonl  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

STEPS = 4
ENGINES = {"ddp": None, "zero2": 2, "zero3": 3}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_recipe(root: Path, name: str, stage: int | None) -> Path:
    training = {"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "logging_steps": 1,
                "save_steps": 2}  # fmt: skip
    if stage is not None:
        config = {
            "zero_optimization": {"stage": stage},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "train_batch_size": "auto",
        }
        (root / f"{name}.json").write_text(json.dumps(config), encoding="utf-8")
        training["deepspeed"] = f"{name}.json"
    recipe = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
        "training": training,
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "output": {"dir": str(root / "runs" / name)},
    }
    return save_recipe(root, name, recipe)


def torchrun(root: Path, *args) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "llmtune", "finetune", *map(str, args)]  # fmt: skip
    return subprocess.Popen(command, cwd=root, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    write_jsonl(root / "data" / "train.jsonl", chat_rows(24))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(4))
    recipes = {name: write_recipe(root, name, stage) for name, stage in ENGINES.items()}
    procs = {name: torchrun(root, recipe) for name, recipe in recipes.items()}
    results = {name: finish(proc) for name, proc in procs.items()}
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: exit {result.returncode}\n{result.stderr[-6000:]}"
    return root, recipes


def test_each_engine_completes_one_run(runs):
    root, _ = runs
    for name in ENGINES:
        run = root / "runs" / name
        assert json.loads((run / "manifest.json").read_text())["status"] == "completed", name
        assert json.loads((run / "metrics.json").read_text())["steps"] == STEPS, name
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"], name


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_zero_adapter_equals_the_ddp_adapter(runs, name):
    root, _ = runs
    reference, sharded = adapter(root / "runs" / "ddp"), adapter(root / "runs" / name)
    assert sharded.keys() == reference.keys() and len(sharded) == 28
    for key, weight in reference.items():
        assert sharded[key].shape == weight.shape, key  # gathered, not a rank's empty shard
        assert (sharded[key] - weight).abs().max() <= 1e-5, key
    assert max(w.abs().max() for k, w in sharded.items() if "lora_B" in k) > 1e-3  # training moved it
    # DeepSpeed's own sharded state is in each checkpoint, next to the gathered adapter.
    assert (root / "runs" / name / "checkpoint-4" / "global_step4").is_dir()


def test_zero3_resume_reproduces_the_uninterrupted_run(runs):
    root, recipes = runs
    run = root / "runs" / "zero3"
    uninterrupted = adapter(run)
    # As after a kill between the step-2 and step-4 checkpoints.
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    result = finish(torchrun(root, recipes["zero3"], "--resume"))
    assert result.returncode == 0, result.stderr[-6000:]
    assert json.loads((run / "manifest.json").read_text())["resumed_from"] == "checkpoint-2"
    resumed = adapter(run)
    assert resumed.keys() == uninterrupted.keys()
    for key, weight in uninterrupted.items():
        assert torch.equal(resumed[key], weight), key


def test_zero3_run_merges_and_evaluates(runs):
    root, _ = runs
    run = root / "runs" / "zero3"
    merged = subprocess.run(
        [sys.executable, "-m", "llmtune", "merge-adapter", str(run), "--out", str(root / "merged")],
        cwd=root, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-4000:]
    assert (root / "merged" / "model.safetensors").is_file()
    evaluated = subprocess.run(
        [sys.executable, "-m", "llmtune", "eval", str(run), "--out", str(root / "eval.json")],
        cwd=root, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    report = json.loads((root / "eval.json").read_text())
    eval_loss = json.loads((run / "metrics.json").read_text())["eval_loss"]
    assert math.isfinite(report["tuned"]["perplexity"])
    assert report["tuned"]["loss"] == pytest.approx(eval_loss, abs=1e-4)
