"""Encoder-decoder (seq2seq) training on tiny:t5: encoding, a learnable task, and the CLI end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    RECIPES,
    expect_error,
    reverse_rows,
    write_jsonl,
    write_s2s_recipe,
)

from llmtune.batching import pad_rows
from llmtune.data import IGNORE_INDEX
from llmtune.models import load_model, load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.recipe import load_recipe
from llmtune.run import finetune

# --- encoding --------------------------------------------------------------------------------------


def test_rows_become_source_plus_eos_and_target_plus_eos_with_loss_on_every_target_token(tmp_path: Path):
    tok = load_tokenizer("tiny:t5")
    recipe = load_recipe(write_s2s_recipe(tmp_path, rows=4))
    assert recipe.data.chat_template is False  # an encoder-decoder reads plain text
    data = prepare_data(recipe, tok)
    eos = tok.eos_token_id
    for row, source in zip(data.train, reverse_rows(4, seed=0), strict=True):
        plain = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        assert row["input_ids"] == [*plain(source["prompt"]), eos]
        assert row["labels"] == [*plain(source["completion"]), eos]  # no BOS, no masked token
    counts = data.report["train"]
    assert counts["loss_tokens"] == sum(len(r) for r in data.train["labels"])
    assert counts["tokens"] == counts["loss_tokens"] + sum(len(r) for r in data.train["input_ids"])

    # Padded labels are -100, and the model's decoder reads the labels shifted right behind the pad token.
    batch = pad_rows(tok.pad_token_id)([data.train[0], data.train[1], data.train[2]])
    lengths = [len(r) for r in data.train["labels"][:3]]
    for i, n in enumerate(lengths):
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["labels"][i, :n] != IGNORE_INDEX).all()
    model = load_model("tiny:t5", kind="seq2seq-lm")
    assert model.config.decoder_start_token_id == tok.pad_token_id
    decoder_inputs = model._shift_right(batch["labels"])
    assert (decoder_inputs[:, 0] == tok.pad_token_id).all()
    with torch.no_grad():
        out = model(**batch)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=decoder_inputs
        ).logits
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_preview_shows_the_source_then_the_target_as_the_loss_tokens(tmp_path: Path):
    from llmtune.preview import build_preview

    tok = load_tokenizer("tiny:t5")
    preview = build_preview(load_recipe(write_s2s_recipe(tmp_path, rows=4)), tok, n=1)
    [tokens] = preview.rows
    row = reverse_rows(4, seed=0)[0]
    assert "".join(t.text for t in tokens) == f"{row['prompt']}{tok.eos_token}{row['completion']}{tok.eos_token}"
    assert "".join(t.text for t in tokens if t.loss) == f"{row['completion']}{tok.eos_token}"


def test_instruction_rows_join_instruction_and_input_into_the_source(tmp_path: Path):
    tok = load_tokenizer("tiny:t5")
    path = write_s2s_recipe(tmp_path, data={"train": "data/train.jsonl", "format": "instruction", "eval_split": 0})
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"instruction": "Reverse", "input": "abc", "output": "cba"}])
    data = prepare_data(load_recipe(path), tok)
    assert tok.decode(data.train[0]["input_ids"]) == f"Reverse\n\nabc{tok.eos_token}"
    assert tok.decode(data.train[0]["labels"]) == f"cba{tok.eos_token}"


@pytest.mark.parametrize(
    ("sections", "fragments"),
    [
        ({"data": {"train": "data/train.jsonl", "format": "chat"}}, ("data.format", "prompt_completion")),
        (
            {"data": {"train": "data/train.jsonl", "format": "prompt_completion", "chat_template": True}},
            ("data.chat_template", "plain text"),
        ),
        ({"method": {"name": "prompt"}}, ("method prompt", "objective seq2seq")),
    ],
)
def test_bad_seq2seq_recipes_fail_at_load_time(tmp_path: Path, sections: dict[str, Any], fragments):
    with expect_error(*fragments):
        load_recipe(write_s2s_recipe(tmp_path, **sections))


def test_model_kind_mismatches_fail_in_one_line(tmp_path: Path):
    with expect_error("tiny:llama", "seq2seq-lm"):
        load_model("tiny:llama", kind="seq2seq-lm")
    with expect_error("tiny:t5", "use objective seq2seq"):
        load_model("tiny:t5")


def test_recipe_names_a_hub_model_and_offline_says_so(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = load_recipe(RECIPES / "seq2seq.yaml")
    assert (recipe.model, recipe.objective.name, recipe.data.format) == (
        "google/flan-t5-small",
        "seq2seq",
        "prompt_completion",
    )
    with expect_error("'google/flan-t5-small'", "could not reach the Hugging Face Hub"):
        finetune(RECIPES / "seq2seq.yaml", [f"output.dir={tmp_path / 'run'}"])
