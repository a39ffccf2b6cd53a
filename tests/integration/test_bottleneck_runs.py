"""Bottleneck adapters through finetune: checkpoints carry them and a resumed run reproduces the uninterrupted one."""

from __future__ import annotations

import json

import pytest
from helpers import probe_logits as logits
from safetensors.torch import load_file

from llmtune import artifacts
from llmtune.bottleneck import WEIGHTS_FILE
from llmtune.models import load_model, load_tuned
from llmtune.run import finetune

# The tiny models train much faster on one thread on a busy two-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_checkpoints_carry_the_adapters_and_resume_reproduces_the_uninterrupted_run(make_recipe):
    recipe = make_recipe(
        "adapter",
        method={"name": "adapter", "placement": "houlsby"},
        training={
            "max_steps": 4,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "seed": 0,
            # Windows of 3 that do not end at checkpoint-2: the checkpoint logs its own window.
            "logging_steps": 3,
            "save_steps": 2,
            "keep_checkpoints": None,
        },
    )
    run = finetune(recipe).run.path
    uninterrupted = load_file(run / artifacts.ADAPTER_DIR / WEIGHTS_FILE)
    uninterrupted_metrics = json.loads((run / artifacts.METRICS_FILE).read_text())
    checkpoint = run / "checkpoint-2"

    # A checkpoint loads on its own (eval / generate on it), with the step-2 adapters: trained, not final.
    at_step_2, _ = load_tuned(checkpoint)
    final, _ = load_tuned(run)
    base = logits(load_model("tiny:llama"))
    assert (logits(at_step_2) - base).abs().max() > 0
    assert (logits(at_step_2) - logits(final)).abs().max() > 0

    finetune(recipe, resume=checkpoint)
    resumed = load_file(run / artifacts.ADAPTER_DIR / WEIGHTS_FILE)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) == 16  # 4 adapters x down/up x weight/bias
    worst = max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed)
    assert worst <= 1e-6
    # The mean loss reported is over all 4 steps, as in the uninterrupted run, not over the 2 resumed ones.
    metrics = json.loads((run / artifacts.METRICS_FILE).read_text())
    assert metrics["train_loss"] == pytest.approx(uninterrupted_metrics["train_loss"], abs=1e-6)
    logged = [(e["step"], e["loss"]) for e in map(json.loads, (run / artifacts.TRAINER_LOG_FILE).open()) if "loss" in e]
    assert [step for step, _ in logged] == [2, 3, 4]
