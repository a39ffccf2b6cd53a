"""Prompting baselines in `llmtune eval` (eval.prompting / --prompting): the few-shot prompts exactly, the columns,
the predictions file, perplexity over the answer only, and the refusals; on tiny:llama and tiny:t5."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from helpers import (
    chat_rows,
    expect_error,
    loss_text,
    read_jsonl,
    rendered,
    reverse_rows,
    write_classify_recipe,
    write_lm_recipe,
    write_s2s_recipe,
    write_tiny_recipe,
)
from typer.testing import CliRunner

from llmtune.cli.app import app
from llmtune.data import Sample, encode, split_samples
from llmtune.errors import LLMTuneError
from llmtune.evaluation import evaluate, response_nll
from llmtune.models import load_model, load_tokenizer
from llmtune.prompting import BLOCK_SEPARATOR, decoded_prompts, prompted_sets
from llmtune.recipe import load_recipe
from llmtune.run import finetune

COLUMNS = {"perplexity", "loss", "bleu", "rouge1", "rouge2", "rougeL", "exact_match"}


def _recipe(tmp_path: Path, **eval_keys):
    # Room for a few examples in front: tiny:llama's tokens are bytes, so a templated row is ~50 of them.
    data = {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 320}
    return write_tiny_recipe(tmp_path, data=data, eval={"max_new_tokens": 4, "batch_size": 8, **eval_keys})


def test_few_shot_prompts_are_training_rows_in_front_drawn_per_row_by_seed(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, prompting=["zero-shot", "few-shot:3"]))
    sets = prompted_sets(recipe, rows=6, encoder_decoder=False)
    train, held_out = split_samples(recipe)
    trained_turns = [tuple(m["content"] for m in s.messages) for s in train]
    assert sets.samples["zero-shot"] == held_out
    draws = []
    for row, prompted in zip(held_out, sets.samples["few-shot:3"], strict=True):
        *shots, question, answer = prompted.messages
        assert [question, answer] == row.messages  # the row itself comes last, as it is
        pairs = [tuple(m["content"] for m in shots[i : i + 2]) for i in range(0, len(shots), 2)]
        assert len(pairs) == 3 and all(pair in trained_turns for pair in pairs)
        assert tuple(m["content"] for m in row.messages) not in pairs
        assert [m["role"] for m in shots] == ["user", "assistant"] * 3
        assert all(m.get("train") is False for m in shots if m["role"] == "assistant")
        draws.append(pairs)
    # The exact text the base model reads: the examples as earlier turns of the conversation, then the question.
    [text, *_] = decoded_prompts(sets, encoder_decoder=False)["few-shot:3"]
    turns = "".join(
        f"<|im_start|>{role}\n{content}<|im_end|>\n"
        for pair in draws[0]
        for role, content in zip(("user", "assistant"), pair, strict=True)
    )
    question = held_out[0].messages[0]["content"]
    assert text == f"<s>{turns}<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    assert len({tuple(d) for d in draws}) > 1  # drawn anew for each row
    # Seeded: the same draws again; another training.seed draws others.
    again = prompted_sets(recipe, rows=6, encoder_decoder=False).samples["few-shot:3"]
    assert again == sets.samples["few-shot:3"]
    reseeded = recipe.model_copy(update={"training": recipe.training.model_copy(update={"seed": 1})})
    assert prompted_sets(reseeded, rows=6, encoder_decoder=False).samples["few-shot:3"] != again
    # The draw is random.Random(seed).sample over the training rows, row after row.
    rng = random.Random(0)
    first = [tuple(m["content"] for m in s.messages) for s in rng.sample([s for s in train if s != held_out[0]], 3)]
    assert draws[0] == first


def test_eval_adds_prompting_columns_with_their_prompts_and_answer_only_perplexity(tmp_path, one_torch_thread):
    path = _recipe(tmp_path, prompting=["zero-shot", "few-shot:2"])
    run = finetune(path).run.path
    report = evaluate(run, compare_base=True)
    assert list(report.results) == ["tuned", "base", "zero-shot", "few-shot:2"]
    for column in report.results.values():
        assert set(column) == COLUMNS and all(math.isfinite(v) for v in column.values())
    # tiny:llama trains with its own template: zero-shot is the base column, and the notes say so.
    assert report.results["zero-shot"] == report.results["base"]
    assert any(n.startswith("zero-shot:") for n in report.notes)
    assert report.results["few-shot:2"] != report.results["base"]
    saved = json.loads((run / "eval.json").read_text())
    assert saved == report.results
    rows = read_jsonl(run / "eval_predictions.jsonl")
    assert len(rows) == 6
    tok = load_tokenizer("tiny:llama")
    recipe = load_recipe(path)
    sets = prompted_sets(recipe, rows=6, encoder_decoder=False)
    for row, shot in zip(rows, sets.samples["few-shot:2"], strict=True):
        assert set(row["prediction"]) == set(report.results)
        assert row["prompts"]["zero-shot"] == row["prompt"]
        messages = [{"role": m["role"], "content": m["content"]} for m in shot.messages[:-1]]
        assert row["prompts"]["few-shot:2"] == rendered(tok, messages, generation_prompt=True)
        assert row["prompts"]["few-shot:2"].endswith(row["prompt"].removeprefix("<s>"))
    # Perplexity over each row's own answer: the examples' answers carry no loss.
    encoded = [encode(s, tok) for s in sets.samples["few-shot:2"]]
    for (_, labels), plain in zip(encoded, sets.samples["zero-shot"], strict=True):
        assert loss_text(tok, labels) == loss_text(tok, encode(plain, tok)[1])
    base = load_model("tiny:llama")
    nll, n = response_nll(base, tok, [e[0] for e in encoded], [e[1] for e in encoded], batch_size=8)
    assert report.results["few-shot:2"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    # The report shows the columns too, prompting first.
    assert "| metric | zero-shot | few-shot:2 | base | tuned |" in (run / "report.md").read_text()


def test_plain_rows_get_prompt_completion_blocks_in_front(tmp_path, one_torch_thread):
    path = write_s2s_recipe(tmp_path, eval={"max_new_tokens": 4, "batch_size": 8, "prompting": ["few-shot:2"]})
    recipe = load_recipe(path)
    sets = prompted_sets(recipe, rows=8, encoder_decoder=True)
    train = {(r["prompt"], r["completion"]) for r in reverse_rows(48, seed=0)}
    for row, shot in zip(reverse_rows(8, seed=1), sets.samples["few-shot:2"], strict=True):
        *blocks, question, answer = shot.segments
        assert (question, answer) == ((row["prompt"], False), (row["completion"], True))
        assert len(blocks) == 2 and all(not loss and text.endswith(BLOCK_SEPARATOR) for text, loss in blocks)
        assert all((text[: len(text) // 2 - 1], text[len(text) // 2 - 1 : -2]) in train for text, _ in blocks)
    report = evaluate(path, out=tmp_path / "eval.json")
    assert list(report.results) == ["base", "few-shot:2"] and set(report.results["few-shot:2"]) == COLUMNS
    [first, *_] = read_jsonl(tmp_path / "eval_predictions.jsonl")
    blocks = sets.samples["few-shot:2"][0].segments[:2]
    assert first["prompts"]["few-shot:2"] == "".join(t for t, _ in blocks) + first["prompt"]


def test_cli_prints_the_columns_and_refuses_a_bad_mode(tmp_path):
    path = _recipe(tmp_path)
    result = CliRunner().invoke(app, ["eval", str(path), "--prompting", "zero-shot, few-shot:1"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("metric"))
    assert lines[start].split() == ["metric", "zero-shot", "few-shot:1", "base"]
    assert [len(line.split()) for line in lines[start + 1 : start + 8]] == [4] * 7
    result = CliRunner().invoke(app, ["eval", str(path), "--prompting", "three-shot"])
    assert isinstance(result.exception, LLMTuneError) and result.exception.exit_code == 2
    assert "'three-shot' is not a prompting mode" in str(result.exception)


@pytest.mark.parametrize(
    "mode, fragments",
    [
        ("few-shot:0", ["'few-shot:0' is not a prompting mode"]),
        # 24 training rows, of which 4 equal held-out row 1 (chat_rows repeats every 7 rows).
        ("few-shot:24", ["few-shot:24", "has 20 rows", "held-out row 1", "at most 20"]),
    ],
)
def test_k_beyond_the_training_data_is_refused(tmp_path, mode, fragments):
    path = _recipe(tmp_path)
    with expect_error(*fragments):
        evaluate(path, prompting=[mode])


def test_examples_that_do_not_fit_max_length_are_refused_with_the_length_needed(tmp_path):
    path = write_tiny_recipe(tmp_path, eval={"prompting": ["few-shot:6"]})
    with expect_error("few-shot:6", "6 of 6 held-out rows exceed data.max_length=96", "--set data.max_length="):
        evaluate(path)


def test_objectives_without_prompts_to_answer_refuse_prompting(tmp_path):
    with expect_error("eval.prompting", "objective classify", "sft"):
        load_recipe(write_classify_recipe(tmp_path), ["eval.prompting=[zero-shot]"])
    with expect_error("eval.prompting", "objective lm"):
        load_recipe(write_lm_recipe(tmp_path), ["eval.prompting=[zero-shot]"])
    with expect_error("zero-shot listed more than once"):
        load_recipe(_recipe(tmp_path), ["eval.prompting=[zero-shot, zero-shot]"])


def test_chat_rows_helper_has_duplicates_so_the_row_itself_is_excluded():
    # chat_rows repeats every 7 rows: held-out rows equal training rows, which the draw must skip.
    rows = chat_rows(24)
    assert rows[0] == rows[7]
    assert Sample(messages=rows[0]["messages"]) == Sample(messages=rows[7]["messages"])
