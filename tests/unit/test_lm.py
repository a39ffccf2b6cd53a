"""Objective lm (continued pretraining): text cut into fixed blocks, loss on every token, perplexity.

End to end on tiny:llama: `finetune` through the real CLI once per module, then eval and merge-adapter
through the library calls those commands make (a subprocess each would double the test time).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from helpers import expect_error, logits_of, ok, run_cli

from llmtune.data import group_texts, prepare_data
from llmtune.evaluation import evaluate
from llmtune.merge import merge_adapter
from llmtune.models import load_model, load_tokenizer
from llmtune.recipe import load_recipe

WORDS = "one two three four five six seven eight nine ten".split()


def counting_corpus(n: int, start: int = 0) -> str:
    """Paragraphs that count on from a different word each time: easy to learn, never identical in order."""
    paragraphs = []
    for i in range(start, start + n):
        k = i % len(WORDS)
        paragraphs.append(" ".join(WORDS[k:] + WORDS[:k]) + ".")
    return "\n\n".join(paragraphs) + "\n"


def write_lm_recipe(root: Path, name: str = "lm", **sections) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "train.txt").write_text(counting_corpus(60), encoding="utf-8")
    (root / "data" / "eval.txt").write_text(counting_corpus(8, start=3), encoding="utf-8")
    recipe = {
        "model": "tiny:llama",
        # The random tiny model's head must learn the new vocabulary too; LoRA on the blocks alone barely moves.
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]},
        "objective": {"name": "lm"},
        "data": {"train": "data/train.txt", "eval": "data/eval.txt", "format": "text", "max_length": 64},
        "training": {"max_steps": 20, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "logging_steps": 5},
        "eval": {"batch_size": 8},
        "output": {"dir": str(root / "runs" / name)},
        **sections,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


# --- blocking --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 3, 7, 16])
def test_group_texts_cuts_exact_blocks_and_loses_only_the_tail(block: int):
    rows = [[1, 2, 3], [], [4, 5, 6, 7, 8], [9], [10, 11]]
    eos = 99
    stream = [t for r in rows for t in (*r, eos)]
    blocks, dropped = group_texts(rows, eos, block, keep_remainder=False)
    assert all(len(b) == block for b in blocks)
    joined = [t for b in blocks for t in b]
    # Nothing lost, reordered or repeated: the blocks are the stream, less a tail shorter than a block.
    assert joined == stream[: len(joined)]
    assert dropped == len(stream) - len(joined) and 0 <= dropped < block

    kept, none_dropped = group_texts(rows, eos, block, keep_remainder=True)
    assert none_dropped == 0 and [t for b in kept for t in b] == stream
    assert all(len(b) == block for b in kept[:-1]) and 0 < len(kept[-1]) <= block


def test_prepared_blocks_hold_every_token_once_with_labels_on_all(tmp_path: Path):
    recipe = load_recipe(write_lm_recipe(tmp_path, "blocks"))
    tokenizer = load_tokenizer("tiny:llama")
    data = prepare_data(recipe, tokenizer)

    paragraphs = counting_corpus(60).strip().split("\n\n")
    stream = [t for p in paragraphs for t in (*tokenizer(p, add_special_tokens=False)["input_ids"], 2)]
    assert tokenizer.eos_token_id == 2
    train = data.train
    assert all(len(ids) == 64 for ids in train["input_ids"])
    assert train["labels"] == train["input_ids"]  # every token is a target
    joined = [t for ids in train["input_ids"] for t in ids]
    report = data.report["train"]
    assert joined == stream[: len(joined)]
    assert report["remainder_tokens"] == len(stream) - len(joined) < 64
    assert report["rows"] == len(train) == len(stream) // 64 and report["documents"] == 60
    # Held-out text keeps its short last block: every held-out token is scored.
    assert sum(len(ids) for ids in data.eval["input_ids"]) == data.report["eval"]["tokens"]
    assert data.report["eval"]["remainder_tokens"] == 0


def test_text_shorter_than_one_block_is_refused(tmp_path: Path):
    recipe = load_recipe(write_lm_recipe(tmp_path, "short"), ["data.max_length=100000"])
    with expect_error("train.txt", "less than one block of data.max_length=100000", "lower data.max_length"):
        prepare_data(recipe, load_tokenizer("tiny:llama"))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.format=chat", "data.format: objective lm trains on plain text"),
        ("data.packing=true", "data.packing: objective lm already packs"),
        ("data.padding_free=true", "data.padding_free: only objective sft puts rows end to end"),
        ("eval.metrics=[perplexity, bleu]", "eval.metrics: bleu do not apply to objective lm"),
    ],
)
def test_recipe_refuses_what_lm_cannot_do(tmp_path: Path, override: str, fragment: str):
    with expect_error(fragment):
        load_recipe(write_lm_recipe(tmp_path), [override])


def test_lm_recipe_reports_perplexity_by_default(tmp_path: Path):
    assert load_recipe(write_lm_recipe(tmp_path)).eval.metrics == ["perplexity"]


# --- end to end on tiny:llama ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lm")
    result = ok(run_cli("finetune", str(write_lm_recipe(root)), cwd=root))
    assert "in blocks of 64 from 60 documents" in result.stdout
    return root, root / "runs" / "lm"


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


def test_data_preview_shows_the_blocks_training_sees(tmp_path: Path):
    from llmtune.preview import build_preview

    recipe = load_recipe(write_lm_recipe(tmp_path))
    preview = build_preview(recipe, load_tokenizer("tiny:llama"), n=2)
    assert [len(row) for row in preview.rows] == [64, 64]
    assert all(token.loss for row in preview.rows for token in row)
    assert preview.counts == prepare_data(recipe, load_tokenizer("tiny:llama")).report["train"]
