"""Seq2seq training in-process on tiny:t5: the loss falls, and gradient accumulation matches one big batch."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import read_jsonl, write_s2s_recipe

from llmtune.evaluation import evaluate
from llmtune.run import finetune

# --- training --------------------------------------------------------------------------------------


def test_loss_falls_on_string_reversal(tmp_path: Path, one_torch_thread):
    training = {"max_steps": 40, "batch_size": 8, "learning_rate": 3e-3, "seed": 0, "logging_steps": 5}
    path = write_s2s_recipe(tmp_path, method={"name": "full"}, training=training, eval={"metrics": ["perplexity"]})
    result = finetune(path)
    log = [entry for entry in read_jsonl(result.run.path / "trainer_log.jsonl") if "loss" in entry]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]
    report = evaluate(result.run.path, compare_base=True)
    tuned, base = report.results["tuned"], report.results["base"]
    # Held-out strings the model never saw: perplexity over the target tokens drops by more than half.
    assert tuned["perplexity"] < 0.5 * base["perplexity"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path, one_torch_thread):
    # T5 ignores num_items_in_batch; the Trainer must then divide its mean loss by grad_accum itself.
    logged = {}
    for grad_accum, batch_size in ((1, 8), (2, 4)):
        training = {"max_steps": 1, "batch_size": batch_size, "grad_accum": grad_accum, "seed": 0, "logging_steps": 1}
        path = write_s2s_recipe(tmp_path, f"ga{grad_accum}", rows=8, method={"name": "full"}, training=training)
        [first, *_] = read_jsonl(finetune(path).run.path / "trainer_log.jsonl")
        logged[grad_accum] = (first["loss"], first["grad_norm"])
    assert logged[2] == pytest.approx(logged[1], rel=0.05)
