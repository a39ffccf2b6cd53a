"""A token-classify run on tiny:bert: finetune, eval beside the base with the predictions file, merge-adapter with
its logit check, generate printing word/TAG, and serve / chat / export refusing a tagger."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import expect_error, read_jsonl, save_recipe, write_jsonl

from llmtune.evaluation import evaluate
from llmtune.export import export_gguf
from llmtune.generation import complete, load_generator
from llmtune.merge import merge_adapter
from llmtune.run import finetune

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
PEOPLE = [["Ada", "Lee"], ["Bo"], ["Cy", "Ng"]]
PLACES = [["Rome"], ["Oslo"], ["New", "York"]]


def ner_rows(n: int, seed: int) -> list[dict]:
    """'on PERSON saw PLACE': the tag of each word follows from its position."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        tokens = ["on", *person, "saw", *place]
        tags = ["O", "B-PER", *["I-PER"] * (len(person) - 1), "O", "B-LOC", *["I-LOC"] * (len(place) - 1)]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


@pytest.fixture(scope="module")
def tag_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tag")
    write_jsonl(root / "data" / "train.jsonl", ner_rows(64, seed=0))
    write_jsonl(root / "data" / "eval.jsonl", ner_rows(8, seed=1))
    recipe = {
        "model": "tiny:bert",
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "objective": {"name": "token-classify", "labels": LABELS},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "token_classification"},
        "training": {"max_steps": 16, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "logging_steps": 4},
        "eval": {"batch_size": 8},
        "output": {"dir": str(root / "runs" / "tag")},
    }
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model trains faster on one thread of a busy two-core machine
    try:
        result = finetune(save_recipe(root, "tag", recipe))
    finally:
        torch.set_num_threads(before)
    return root, result.run.path


def test_tuned_tagger_beats_its_untrained_head_and_writes_predictions(tag_run, one_torch_thread):
    _, run = tag_run
    report = evaluate(run, compare_base=True)
    assert json.loads((run / "eval.json").read_text()) == report.results
    tuned, base = report.results["tuned"], report.results["base"]
    assert set(tuned) == set(base) == {"accuracy", "precision", "recall", "f1"}
    assert tuned["accuracy"] >= 90 and tuned["f1"] >= 80
    assert base["accuracy"] < 60 and tuned["f1"] > base["f1"]
    assert any("untrained" in note for note in report.notes)
    rows = read_jsonl(run / "eval_predictions.jsonl")
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ner_rows(8, seed=1)]
    assert all(len(r["prediction"]["tuned"]) == len(r["prediction"]["base"]) == len(r["tags"]) for r in rows)
    hits = sum(p == t for r in rows for p, t in zip(r["prediction"]["tuned"], r["tags"], strict=True))
    # The saved predictions are the ones scored: their accuracy is the reported one.
    assert 100 * hits / sum(len(r["tags"]) for r in rows) == pytest.approx(tuned["accuracy"])


def test_merge_checks_the_token_head_and_reloads_as_a_plain_tagger(tag_run, one_torch_thread):
    from transformers import AutoModelForTokenClassification

    root, run = tag_run
    result = merge_adapter(run, root / "merged")
    assert result.max_abs_diff <= 1e-3 and result.reload_max_abs_diff <= 1e-3 and result.base_max_abs_diff > 1e-3
    merged = AutoModelForTokenClassification.from_pretrained(result.out)
    assert type(merged).__name__ == "BertForTokenClassification" and merged.config.id2label == dict(enumerate(LABELS))


def test_generate_prints_each_word_with_its_tag(tag_run, one_torch_thread):
    _, run = tag_run
    assert complete(str(run), "on Ada Lee saw New York") == "on/O Ada/B-PER Lee/I-PER saw/O New/B-LOC York/I-LOC"


def test_serve_chat_and_export_refuse_a_tagger(tag_run):
    root, run = tag_run
    with expect_error("is a tagger", "does not generate", f"llmtune generate {run} TEXT"):
        load_generator(run)  # what serve, chat and generate --input load
    with expect_error("objective 'token-classify' trains a token-classification model"):
        export_gguf(run, root / "tag.gguf")
    assert not (root / "tag.gguf").exists()
