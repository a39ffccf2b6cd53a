"""Distillation runs: a tuned teacher, a student trained towards it and evaluated (in-process and through the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import ok, read_jsonl, run_cli, write_tiny_recipe

from llmtune.run import finetune

# --- training and evaluation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, one_torch_thread) -> Path:
    """A tuned teacher: tiny:llama trained in full on the counting task until its answers are confident."""
    root = tmp_path_factory.mktemp("teacher")
    training = {"max_steps": 12, "batch_size": 8, "learning_rate": 3e-3, "seed": 0, "logging_steps": 1}
    path = write_tiny_recipe(root, "teacher", method={"name": "full"}, training=training)
    return finetune(path).run.path


def test_distill_finetune_then_cli_eval_brings_the_student_to_the_teacher(teacher_run: Path, tmp_path: Path):
    objective = {"name": "distill", "teacher": str(teacher_run), "alpha": 0.0, "temperature": 1.0}
    training = {"max_steps": 10, "batch_size": 8, "learning_rate": 3e-3, "seed": 1, "logging_steps": 1}
    path = write_tiny_recipe(tmp_path, "student", method={"name": "full"}, objective=objective, training=training)
    run = finetune(path).run.path
    log = [entry for entry in read_jsonl(run / "trainer_log.jsonl") if "distill_divergence" in entry]
    assert len(log) == 10
    # alpha 0: the loss is the divergence alone, and it falls.
    assert log[0]["loss"] == pytest.approx(log[0]["distill_divergence"], rel=1e-4)
    assert log[-1]["distill_divergence"] < 0.5 * log[0]["distill_divergence"]

    result = ok(run_cli("eval", str(run), cwd=tmp_path))
    header = result.stdout.splitlines()[0].split()
    assert header == ["metric", "base", "tuned", "delta", "teacher"]
    evaluation = json.loads((run / "eval.json").read_text())
    assert set(evaluation) == {"tuned", "base", "teacher"}
    tuned, base, teacher = evaluation["tuned"], evaluation["base"], evaluation["teacher"]
    assert tuned["kl_to_teacher"] < 0.5 * base["kl_to_teacher"]
    # Closer to the teacher means closer to its perplexity on the data it was tuned for.
    assert abs(tuned["perplexity"] - teacher["perplexity"]) < abs(base["perplexity"] - teacher["perplexity"])
    predictions = read_jsonl(run / "eval_predictions.jsonl")
    assert set(predictions[0]["prediction"]) == {"tuned", "base", "teacher"}


def test_student_cut_from_a_tuned_teacher_trains_a_lora_adapter_and_evaluates(teacher_run: Path, tmp_path: Path):
    from llmtune.evaluation import evaluate
    from llmtune.merge import merge_adapter

    ref = str(teacher_run)
    objective = {"name": "distill", "teacher": ref, "student": {"from_teacher": "every_other_layer"}}
    path = write_tiny_recipe(tmp_path, "cut", model=ref, objective=objective)
    run = finetune(path).run.path
    assert (run / "adapter" / "adapter_config.json").is_file()
    report = evaluate(run)
    # The untrained student is the teacher cut in half: already near it, and the KL is reported for both.
    assert report.results["base"]["kl_to_teacher"] > 0
    assert report.results["tuned"]["kl_to_teacher"] > 0
    merged = merge_adapter(run, tmp_path / "merged")
    assert merged.max_abs_diff <= 1e-3 and merged.base_max_abs_diff > 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
