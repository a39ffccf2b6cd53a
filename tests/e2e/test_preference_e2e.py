"""DPO end to end through the CLI: finetune, eval --compare-base, merge-adapter, and what the run logs."""

from __future__ import annotations

import json
import math

import pytest
from helpers import write_preference_recipe
from typer.testing import CliRunner

from llmtune.cli.app import app


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, one_torch_thread):
    """finetune -> eval --compare-base -> merge-adapter through the CLI, once for the module."""
    root = tmp_path_factory.mktemp("dpo")
    path = write_preference_recipe(root, training={"max_steps": 10})
    run = root / "runs" / "dpo"
    results = {
        "finetune": CliRunner().invoke(app, ["finetune", str(path)]),
        "eval": CliRunner().invoke(app, ["eval", str(run), "--compare-base"]),
        "merge": CliRunner().invoke(app, ["merge-adapter", str(run), "--out", str(root / "merged")]),
    }
    return run, results


def test_dpo_e2e_finetune_eval_merge(dpo_run):
    run, results = dpo_run
    for command, result in results.items():
        assert result.exit_code == 0, f"{command}: {result.output}\n{result.exception!r}"
    assert "preference_accuracy" in results["eval"].output
    assert "merged into" in results["merge"].output
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run.parent.parent / "merged" / "config.json").is_file()


def test_dpo_logs_reward_margins_and_accuracies(dpo_run):
    run, _ = dpo_run
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 11))
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert all(key in e for e in steps), key
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0


def test_dpo_raises_heldout_preference_accuracy(dpo_run):
    run, _ = dpo_run
    results = json.loads((run / "eval.json").read_text())
    base, tuned = results["base"], results["tuned"]
    # The untrained tiny model prefers the right count on fewer than half of the held-out pairs.
    assert base["preference_accuracy"] < 50
    assert tuned["preference_accuracy"] >= 87.5
    assert tuned["logp_margin"] > base["logp_margin"] + 1.0
