"""Encoder-decoder (seq2seq) training on tiny:t5: encoding, a learnable task, and the CLI end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import RECIPES, expect_error, ok, read_jsonl, run_cli, write_jsonl, write_tiny_recipe
from transformers import AutoModelForSeq2SeqLM

from llmtune.data import IGNORE_INDEX, prepare_data
from llmtune.evaluation import complete, evaluate, generate_texts
from llmtune.merge import merge_adapter
from llmtune.models import load_model, load_tokenizer, load_tuned
from llmtune.objectives import _pad_rows
from llmtune.recipe import load_recipe
from llmtune.run import finetune


def reverse_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Short strings over four letters and their reversals: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcd") for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": word, "completion": word[::-1]})
    return rows


def write_s2s_recipe(root: Path, name: str = "s2s", rows: int = 48, **sections: Any) -> Path:
    """A tiny:t5 seq2seq recipe on the reversal task; keyword sections replace the defaults."""
    defaults: dict[str, Any] = {
        "model": "tiny:t5",
        "objective": {"name": "seq2seq"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "prompt_completion"},
        "eval": {"max_new_tokens": 6, "batch_size": 8},
    }
    path = write_tiny_recipe(root, name, **{**defaults, **sections})
    write_jsonl(root / "data" / "train.jsonl", reverse_rows(rows, seed=0))
    write_jsonl(root / "data" / "eval.jsonl", reverse_rows(8, seed=1))
    return path


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
    batch = _pad_rows(tok.pad_token_id)([data.train[0], data.train[1], data.train[2]])
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


def test_finetune_eval_merge_generate_through_cli_and_library(tmp_path: Path):
    training = {"max_steps": 6, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "logging_steps": 2}
    path = write_s2s_recipe(tmp_path, training=training)
    ok(run_cli("finetune", str(path), cwd=tmp_path))
    run = tmp_path / "runs" / "s2s"
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"

    evaluate(run, compare_base=True)
    evaluation = json.loads((run / "eval.json").read_text())
    for name in ("tuned", "base"):
        assert {"perplexity", "bleu", "rouge1", "rougeL", "exact_match"} <= set(evaluation[name])
    assert evaluation["tuned"]["perplexity"] < evaluation["base"]["perplexity"]
    predictions = read_jsonl(run / "eval_predictions.jsonl")
    assert predictions[0]["prompt"].endswith(load_tokenizer("tiny:t5").eos_token)
    assert predictions[0]["reference"] == reverse_rows(8, seed=1)[0]["completion"]

    merged = tmp_path / "merged"
    result = merge_adapter(run, merged)
    assert result.max_abs_diff <= 1e-3 and result.base_max_abs_diff > 0
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(merged)
    tuned, tok = load_tuned(run)
    ids = torch.tensor([tok("abcd", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    decoder = torch.tensor([[tok.pad_token_id, *ids[0, :-1].tolist()]])
    with torch.no_grad():
        a = tuned(input_ids=ids, decoder_input_ids=decoder).logits
        b = reloaded(input_ids=ids, decoder_input_ids=decoder).logits
    assert torch.allclose(a, b, atol=1e-4)

    # The merged directory through the CLI and the run directory in-process generate what the reloaded model does.
    [expected] = generate_texts(reloaded, tok, [ids[0].tolist()], max_new_tokens=6, batch_size=1)
    text = ok(run_cli("generate", str(merged), "abcd", "--max-new-tokens", "6", cwd=tmp_path)).stdout.strip()
    assert text == expected == complete(str(run), "abcd", max_new_tokens=6)


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path, one_torch_thread):
    # T5 ignores num_items_in_batch; the Trainer must then divide its mean loss by grad_accum itself.
    logged = {}
    for grad_accum, batch_size in ((1, 8), (2, 4)):
        training = {"max_steps": 1, "batch_size": batch_size, "grad_accum": grad_accum, "seed": 0, "logging_steps": 1}
        path = write_s2s_recipe(tmp_path, f"ga{grad_accum}", rows=8, method={"name": "full"}, training=training)
        [first, *_] = read_jsonl(finetune(path).run.path / "trainer_log.jsonl")
        logged[grad_accum] = (first["loss"], first["grad_norm"])
    assert logged[2] == pytest.approx(logged[1], rel=0.05)
