"""Padding-free batches through finetune on tiny:llama: the loss curve of padded batches, and where 'auto' pads."""

from __future__ import annotations

import json

import pytest

import llmtune.objectives
from llmtune.run import finetune


def _train(make_recipe, name, method, padding_free, batches):
    def build(*args, real=llmtune.objectives.OBJECTIVES["sft"].build_trainer, **kwargs):
        trainer = real(*args, **kwargs)
        batches.append(next(iter(trainer.get_train_dataloader())))
        return trainer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llmtune.objectives.OBJECTIVES["sft"], "build_trainer", build)
        path = make_recipe(
            name,
            method=method,
            data={
                "train": "data/train.jsonl",
                "eval": "data/eval.jsonl",
                "format": "chat",
                "max_length": 96,
            },
            training={"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "bf16": False},
            speed={"padding_free": padding_free},
        )
        run = finetune(path).run
    log = [json.loads(line) for line in (run.path / "trainer_log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in log if "loss" in entry], json.loads((run.path / "metrics.json").read_text())


def test_padding_free_finetune_follows_the_padded_loss_curve(make_recipe):
    lora = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
    flat_batches, padded_batches = [], []
    flat_curve, flat_metrics = _train(make_recipe, "flat", lora, "auto", flat_batches)
    padded_curve, padded_metrics = _train(make_recipe, "padded", lora, False, padded_batches)
    # 'auto' puts the rows end to end: one sequence, no attention mask, no padding.
    flat, padded = flat_batches[0], padded_batches[0]
    assert "attention_mask" not in flat and flat["input_ids"].size(0) == 1
    assert flat["input_ids"].size(1) == int(padded["attention_mask"].sum()) < padded["input_ids"].numel()
    assert len(flat_curve) == 3
    assert flat_curve == pytest.approx(padded_curve, rel=1e-4)
    assert flat_metrics["eval_loss"] == pytest.approx(padded_metrics["eval_loss"], rel=1e-4)


def test_padding_free_auto_pads_rows_for_virtual_tokens(make_recipe):
    batches = []
    _train(make_recipe, "prompt", {"name": "prompt", "num_virtual_tokens": 3}, "auto", batches)
    assert "attention_mask" in batches[0] and batches[0]["input_ids"].size(0) == 4
