"""A few LoRA steps on the real pretrained builtin model, then eval against its base, in-process."""

from __future__ import annotations

import json
import math

import pytest
from helpers import METRIC_KEYS, write_jsonl

from llmtune import artifacts
from llmtune.evaluation import evaluate
from llmtune.models import load_tokenizer
from llmtune.run import finetune

BUILTIN = "builtin:smollm2-135m-instruct"
# Questions a small instruct model answers plausibly, so its base perplexity says something about the pipeline.
QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What color is the sky on a clear day?", "The sky is blue."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do bees make?", "Bees make honey."),
    ("What is two plus two?", "Two plus two is four."),
    ("Which animal says meow?", "A cat says meow."),
]


def qa_rows(pairs):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]


@pytest.mark.slow
def test_builtin_model_finetunes_and_evaluates_against_its_base(make_recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the builtin model ships in a package: no hub needed
    recipe = make_recipe(
        name="builtin",
        model=BUILTIN,
        method={"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        data={"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 64},
        training={"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 0, "logging_steps": 1},
        eval={"max_new_tokens": 8, "batch_size": 4, "max_examples": 4},
    )
    write_jsonl(recipe.parent / "data" / "train.jsonl", qa_rows(QA))
    write_jsonl(recipe.parent / "data" / "eval.jsonl", qa_rows(QA[:4]))
    run = finetune(recipe).run

    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert load_tokenizer(str(run.tokenizer)).chat_template == load_tokenizer(BUILTIN).chat_template
    assert run.manifest()["status"] == "completed"
    train_metrics = json.loads(run.file(artifacts.METRICS_FILE).read_text())
    assert train_metrics["steps"] == 3 and math.isfinite(train_metrics["train_loss"])

    report = evaluate(run.path, compare_base=True)
    assert report.examples == 4
    on_disk = json.loads(run.file(artifacts.EVAL_FILE).read_text())
    assert on_disk == report.results
    assert set(on_disk) == {"tuned", "base"}
    assert all(set(scores) == METRIC_KEYS for scores in on_disk.values())
    # A pretrained 135M model is far from uniform over its 49k-token vocabulary on plain English answers
    # (uniform would be 49152); a template, masking or padding mistake in scoring pushes it past that.
    assert 1 < on_disk["base"]["perplexity"] < 1e4
    assert math.isfinite(on_disk["tuned"]["perplexity"])

    rows = [json.loads(line) for line in run.file(artifacts.PREDICTIONS_FILE).read_text().splitlines()]
    assert len(rows) == 4
    assert all(set(r["prediction"]) == {"tuned", "base"} for r in rows)
    assert [r["reference"] for r in rows] == [a for _, a in QA[:4]]
    assert any(r["prediction"]["base"] for r in rows)  # the instruct model answers rather than stopping at once
