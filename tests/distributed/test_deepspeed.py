"""DeepSpeed ZeRO-2 and ZeRO-3 through `torchrun -m llmtune finetune`, 2 CPU processes (DeepSpeed's CPU accelerator,
gloo) on tiny:llama.

One module fixture runs, as users type them:
- a ZeRO-2 run and a ZeRO-3 run of four steps, checkpointing every two, started together;
- the ZeRO-3 run resumed from its step-2 checkpoint (`--resume-from`), which must end with the adapter the
  uninterrupted run ended with: the partitioned optimizer state, the schedule and every rank's RNG restored;
- `merge-adapter` and `eval` on the ZeRO-3 run directory, which must work from it alone.

ZeRO-3 partitions every weight over the processes: an adapter saved without gathering holds empty tensors, so the
saved shapes are checked against the model's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import chat_rows, free_port, save_recipe, write_jsonl
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

NPROC = 2
STEPS = 4
R = 4
ZERO = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
    "bf16": {"enabled": "auto"},
}


def _recipe(root: Path, stage: int) -> Path:
    (root / f"zero{stage}.json").write_text(json.dumps({"zero_optimization": {"stage": stage}, **ZERO}))
    return save_recipe(
        root,
        f"zero{stage}",
        {
            "model": "tiny:llama",
            "method": {"name": "lora", "r": R, "alpha": 8, "dropout": 0.0},
            "objective": {"name": "sft"},
            "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
            "training": {
                "max_steps": STEPS,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "seed": 0,
                "logging_steps": 1,
                "save_steps": 2,
                "report_to": [],
                "deepspeed": f"zero{stage}.json",
            },
            "eval": {"max_new_tokens": 4, "batch_size": 4, "metrics": ["perplexity"]},
            "output": {"dir": str(root / "runs" / f"zero{stage}")},
        },
    )


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _torchrun(*args: Any) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC),
        "--master_port", str(free_port()), "-m", "llmtune", *map(str, args),
    ]  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: int = 400) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    return result


def _cli(root: Path, *args: Any) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtune", *map(str, args)], cwd=root, env=_env(), stdout=-1, stderr=-1, text=True
    )
    return _finish(proc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("deepspeed")
    write_jsonl(root / "data" / "train.jsonl", chat_rows(32))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(4))
    recipes = {stage: _recipe(root, stage) for stage in (2, 3)}
    procs = {
        stage: subprocess.Popen(_torchrun("finetune", recipe), cwd=root, env=_env(), stdout=-1, stderr=-1, text=True)
        for stage, recipe in recipes.items()
    }
    results = {stage: _finish(proc) for stage, proc in procs.items()}
    run3 = root / "runs" / "zero3"
    uninterrupted = load_file(run3 / "adapter" / "adapter_model.safetensors")
    shutil.copytree(run3, root / "uninterrupted")
    resumed = _finish(
        subprocess.Popen(
            _torchrun("finetune", recipes[3], "--resume-from", run3 / "checkpoint-2"),
            cwd=root,
            env=_env(),
            stdout=-1,
            stderr=-1,
            text=True,
        )  # fmt: skip
    )
    merged = _cli(root, "merge-adapter", run3, "--out", root / "merged")
    evaluated = _cli(root, "eval", run3)
    return {
        "root": root,
        "results": results,
        "uninterrupted": uninterrupted,
        "resumed": resumed,
        "merged": merged,
        "evaluated": evaluated,
    }


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_runs_train_every_step_once_and_save_a_whole_adapter(runs, stage):
    run = runs["root"] / "runs" / f"zero{stage}"
    # The ZeRO-3 run as it ended before its resume appended to the log.
    logged = (runs["root"] / "uninterrupted" if stage == 3 else run) / "trainer_log.jsonl"
    log = [json.loads(line) for line in logged.read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert [e["step"] for e in log if "loss" in e] == list(range(1, STEPS + 1))
    assert losses[-1] < losses[0]
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    from llmtune.models import load_model

    widths = {name: m.in_features for name, m in load_model("tiny:llama").named_modules() if hasattr(m, "in_features")}
    assert adapter
    for name, tensor in adapter.items():
        layer = name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        if ".lora_A." in name:
            assert tuple(tensor.shape) == (R, widths[layer]), name
        assert tensor.numel() > 0 and torch.isfinite(tensor).all(), name
    # B starts at zero: trained, at least one has moved.
    assert any(t.abs().max() > 0 for n, t in adapter.items() if ".lora_B." in n)
    # One summary, printed by rank 0.
    assert len([line for line in runs["results"][stage].stdout.splitlines() if line.startswith("done: ")]) == 1


def test_zero3_resumed_from_a_checkpoint_ends_with_the_uninterrupted_adapter(runs):
    resumed = load_file(runs["root"] / "runs" / "zero3" / "adapter" / "adapter_model.safetensors")
    expected = runs["uninterrupted"]
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_merge_and_eval_work_from_a_zero3_run(runs):
    merged = runs["root"] / "merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    scores = json.loads((runs["root"] / "runs" / "zero3" / "eval.json").read_text())
    text = json.dumps(scores)
    assert "perplexity" in text
    # The tuned model was scored: a finite perplexity above 1.
    values = [v for k, v in _flatten(scores) if k.endswith("perplexity")]
    assert values and all(1 < v < float("inf") for v in values), scores


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(tree, dict):
        return [item for key, value in tree.items() for item in _flatten(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), tree)] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []
