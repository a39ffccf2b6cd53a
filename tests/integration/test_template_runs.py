"""A base model with no chat template, trained with a named one: new token rows, saved, reloaded, merged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expect_error, write_base_recipe

from llmtune.evaluation import evaluate
from llmtune.merge import merge_adapter
from llmtune.models import load_tuned
from llmtune.preview import preview_data
from llmtune.run import finetune
from llmtune.templates import TEMPLATES

LORA = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0}
NEW = ("<|im_start|>", "<|im_end|>")


def mean_row(weight: torch.Tensor, pretrained: int) -> torch.Tensor:
    return weight[:pretrained].mean(0)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_lora_trains_the_added_rows_and_merge_keeps_them(tmp_path: Path, one_torch_thread, tied):
    recipe = write_base_recipe(tmp_path, method=LORA, tied=tied)
    run = finetune(recipe).run.path
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    model, tokenizer = load_tuned(run)
    ids = tokenizer.convert_tokens_to_ids(list(NEW))
    assert ids == [258, 259]  # after the 258 rows of the base vocabulary
    indices = config["trainable_token_indices"]
    assert sorted(indices) == (["model.embed_tokens"] if tied else ["lm_head", "model.embed_tokens"])
    assert all(v == ids for v in indices.values())

    merged_dir = tmp_path / "merged"
    result = merge_adapter(run, merged_dir)
    assert result.max_abs_diff <= 1e-3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert len(AutoTokenizer.from_pretrained(merged_dir)) == 260
    for layer in (merged.get_input_embeddings(), merged.get_output_embeddings()):
        assert layer.weight.shape[0] == 260
        start = mean_row(layer.weight, 258)
        # The rows moved from their mean-row start; the pretrained rows did not.
        assert all(not torch.allclose(layer.weight[i], start, atol=1e-4) for i in ids)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base-model")
    torch.testing.assert_close(merged.get_input_embeddings().weight[:258], base.get_input_embeddings().weight)
    assert merged.generation_config.eos_token_id == [tokenizer.eos_token_id, ids[1]]


def test_full_finetuning_saves_the_grown_vocabulary_and_evaluates_beside_the_base(tmp_path: Path, one_torch_thread):
    run = finetune(write_base_recipe(tmp_path, method={"name": "full"})).run.path
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(run / "model")
    assert saved.get_input_embeddings().weight.shape[0] == 260
    report = evaluate(run, compare_base=True)
    assert set(report.results) == {"tuned", "base"}
    assert report.results["tuned"]["perplexity"] < report.results["base"]["perplexity"]


def test_preview_of_the_run_renders_what_training_saw(tmp_path: Path, one_torch_thread):
    run = finetune(write_base_recipe(tmp_path, method=LORA)).run.path
    preview = preview_data(run, n=1)
    [row] = preview.rows
    text = "".join(token.text for token in row)
    assert text.startswith("<s><|im_start|>user\n") and "<|im_end|>" in text


def test_a_method_that_cannot_train_new_rows_is_refused_before_training(tmp_path: Path):
    recipe = write_base_recipe(tmp_path, method={"name": "ia3"})
    plain = ", ".join(n for n, t in TEMPLATES.items() if not t.tokens)
    with expect_error("data.chat_template 'chatml'", "<|im_start|>, <|im_end|>", "method ia3", "use lora", plain):
        finetune(recipe)
    assert not (tmp_path / "runs" / "base").exists()
