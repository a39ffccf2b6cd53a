"""Language modelling end to end: finetune through the CLI, then held-out perplexity and the merged model's logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import finetune_through_cli, logits_of, write_lm_recipe

from llmtune.evaluation import evaluate
from llmtune.merge import merge_adapter
from llmtune.models import load_model, load_tokenizer

# --- end to end on tiny:llama ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm")
    return finetune_through_cli(root, write_lm_recipe(root), "in blocks of 64 from 60 documents")


def test_training_lowers_held_out_perplexity(lm_run: tuple[Path, Path], one_torch_thread):
    _, run = lm_run
    evaluate(run, compare_base=True)
    scores = json.loads((run / "eval.json").read_text())
    assert set(scores["tuned"]) == set(scores["base"]) == {"perplexity", "loss"}
    for label in ("tuned", "base"):
        assert scores[label]["perplexity"] == pytest.approx(math.exp(scores[label]["loss"]))
    # A random byte-level model starts near the vocabulary size; the counting text is learned to a fraction.
    assert scores["base"]["perplexity"] > 100
    assert scores["tuned"]["perplexity"] < scores["base"]["perplexity"] / 10


def test_merged_lm_reproduces_the_tuned_logits(lm_run: tuple[Path, Path], one_torch_thread):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, run = lm_run
    out = root / "merged"
    merge_adapter(run, out)
    tokenizer = load_tokenizer("tiny:llama")
    batch = tokenizer(["one two three", "seven eight nine ten one"], padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    tuned = PeftModel.from_pretrained(load_model("tiny:llama"), run / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits_of(merged, batch), logits_of(tuned, batch), atol=1e-4)
    assert not torch.allclose(logits_of(merged, batch), logits_of(load_model("tiny:llama"), batch), atol=1e-2)
