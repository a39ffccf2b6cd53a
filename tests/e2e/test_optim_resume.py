"""A run with the most optimizer state llmtune keeps (paged 8-bit AdamW over LoRA+'s parameter groups, a cosine
schedule to a floor, warmup as a share of the run) killed with SIGKILL through the real CLI, then resumed: the
same losses, learning rates and weights as the uninterrupted run. The other optimizers resume in-process in
tests/integration/test_optim_runs.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import RESUME_TRAINING, checkpoint_names, log_entries, manifest, write_tiny_recipe
from safetensors.torch import load_file

from llmtune.artifacts import CHECKPOINT_PREFIX, COMPLETE_MARKER
from llmtune.run import finetune

pytestmark = [
    # The tiny models train much faster on one thread on a busy two-core machine.
    pytest.mark.usefixtures("one_torch_thread"),
    # bitsandbytes pages optimizer state on CUDA only; on the CPU it says so and keeps it in memory.
    pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU"),
]
STEPS, SAVE_STEPS = 8, 2  # killed once checkpoint-2 is complete, six steps before the end

CLI_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_recipe(root: Path, name: str) -> Path:
    # Rank 64: LoRA's A matrices are 4096 values, the smallest tensor bitsandbytes keeps 8-bit state for.
    method = {"name": "lora", "r": 64, "alpha": 64, "dropout": 0.1, "loraplus_lr_ratio": 16}
    training = {
        **RESUME_TRAINING,
        "max_steps": STEPS,
        "save_steps": SAVE_STEPS,
        "learning_rate": 1e-3,
        "optimizer": {"name": "paged_adamw_8bit", "betas": [0.9, 0.95]},
        "lr_scheduler": {"name": "cosine_with_min_lr", "min_lr_ratio": 0.1},
        "warmup_ratio": 0.1,
        "report_to": [],
    }
    return write_tiny_recipe(root, name, rows=40, method=method, training=training)


def trained_steps(run: Path) -> list[tuple[int, float, float]]:
    return [(e["step"], e["loss"], e["learning_rate"]) for e in log_entries(run) if "loss" in e]


def kill_once_complete(cli: subprocess.Popen, marker: Path) -> None:
    """SIGKILL `cli` as soon as `marker` exists (run in a thread while this process trains the reference run;
    the killed run has six steps, an evaluation and its saves still to go, far longer than a thread's wait)."""
    deadline = time.monotonic() + 300  # a safety net against a hung run, not a timing assertion
    while cli.poll() is None and not marker.is_file() and time.monotonic() < deadline:
        time.sleep(0.001)
    if cli.poll() is None:
        cli.send_signal(signal.SIGKILL)


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    recipe, uninterrupted = write_recipe(tmp_path, "killed"), write_recipe(tmp_path, "reference")
    run = tmp_path / "runs" / "killed"
    err = tmp_path / "killed.err"
    with err.open("w") as stderr:
        cli = subprocess.Popen(
            [sys.executable, "-m", "llmtune", "finetune", recipe.name],
            cwd=tmp_path,
            env={**os.environ, **CLI_ENV},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    killer = threading.Thread(
        target=kill_once_complete, args=(cli, run / f"{CHECKPOINT_PREFIX}{SAVE_STEPS}" / COMPLETE_MARKER)
    )
    killer.start()
    # The uninterrupted run, in this process while the CLI starts up.
    reference = finetune(uninterrupted).run.path
    killer.join()
    assert cli.wait(60) == -signal.SIGKILL, err.read_text()[-3000:]
    assert manifest(run)["status"] == "running" and checkpoint_names(run)

    finetune(recipe, resume=True)
    assert manifest(run)["status"] == "completed"
    assert [s for s, _, _ in trained_steps(run)] == list(range(1, STEPS + 1))
    assert trained_steps(run) == trained_steps(reference)
    expected = load_file(reference / "adapter" / "adapter_model.safetensors")
    got = load_file(run / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
