"""Objective lm (continued pretraining): text cut into fixed blocks, loss on every token, perplexity.

End to end on tiny:llama: `finetune` through the real CLI once per module, then eval and merge-adapter
through the library calls those commands make (a subprocess each would double the test time).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import counting_corpus, expect_error, write_lm_recipe

from llmtune.data import group_texts
from llmtune.models import load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.recipe import load_recipe

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
        ("speed.padding_free=true", "speed.padding_free: only objective sft puts rows end to end"),
        ("eval.metrics=[perplexity, bleu]", "eval.metrics: bleu do not apply to objective lm"),
    ],
)
def test_recipe_refuses_what_lm_cannot_do(tmp_path: Path, override: str, fragment: str):
    with expect_error(fragment):
        load_recipe(write_lm_recipe(tmp_path), [override])


def test_lm_recipe_reports_perplexity_by_default(tmp_path: Path):
    assert load_recipe(write_lm_recipe(tmp_path)).eval.metrics == ["perplexity"]


def test_data_preview_shows_the_blocks_training_sees(tmp_path: Path):
    from llmtune.preview import build_preview

    recipe = load_recipe(write_lm_recipe(tmp_path))
    preview = build_preview(recipe, load_tokenizer("tiny:llama"), n=2)
    assert [len(row) for row in preview.rows] == [64, 64]
    assert all(token.loss for row in preview.rows for token in row)
    assert preview.counts == prepare_data(recipe, load_tokenizer("tiny:llama")).report["train"]
