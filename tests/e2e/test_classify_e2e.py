"""Classification end to end on tiny:llama through the CLI, and the builtin encoder reading the shipped recipe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import CLASSIFY_LABELS as LABELS
from helpers import (
    MINILM_PACKAGE,
    RECIPES,
    finetune_through_cli,
    needs_minilm,
    run_cli,
    write_classify_recipe,
    write_jsonl,
)

from llmtune.data import split_samples
from llmtune.errors import LLMTuneError
from llmtune.evaluation import evaluate
from llmtune.generation import complete
from llmtune.merge import merge_adapter
from llmtune.models import load_base_model, load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.recipe import load_recipe

# --- end to end on tiny:llama ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cls")
    return finetune_through_cli(root, write_classify_recipe(root), "labels negative")


def test_training_raises_accuracy_over_the_untrained_head(cls_run: tuple[Path, Path], one_torch_thread):
    _, run = cls_run
    report = evaluate(run, compare_base=True)
    scores = json.loads((run / "eval.json").read_text())
    assert scores == report.results
    assert set(scores["tuned"]) == set(scores["base"]) == {"accuracy", "f1"}
    assert scores["tuned"]["accuracy"] >= 90 and scores["tuned"]["f1"] >= 90
    assert scores["base"]["accuracy"] < 75
    assert any("untrained" in note for note in report.notes)


def test_merged_classifier_reloads_with_the_same_logits(cls_run: tuple[Path, Path], one_torch_thread):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    root, run = cls_run
    # The new head trains in full and is saved with the adapter.
    assert "base_model.model.score.weight" in load_file(run / "adapter" / "adapter_model.safetensors")
    out = root / "merged"
    merge_adapter(run, out)
    tokenizer = load_tokenizer("tiny:llama")
    batch = tokenizer(["it was good", "so very awful"], padding=True, return_tensors="pt")
    batch = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    recipe = load_recipe(run / "recipe.yaml")
    tuned = PeftModel.from_pretrained(load_base_model(recipe), run / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    with torch.no_grad():
        tuned_logits, merged_logits = tuned(**batch).logits, merged(**batch).logits
    assert torch.allclose(merged_logits, tuned_logits, atol=1e-4)
    assert merged_logits.argmax(-1).tolist() == [1, 0]


def test_generate_prints_the_predicted_label_and_probabilities(cls_run: tuple[Path, Path], one_torch_thread):
    _, run = cls_run
    text = complete(str(run), "the acting was good")
    label, _, probs = text.partition("  ")
    assert label == "positive"
    shown = dict(item.split() for item in probs.strip("()").split(", "))
    assert set(shown) == set(LABELS) and sum(float(p) for p in shown.values()) == pytest.approx(1, abs=2e-3)
    assert complete(str(run), "the plot was awful").startswith("negative  (negative ")


def test_bad_label_through_the_cli_is_one_line(tmp_path: Path):
    path = write_classify_recipe(tmp_path)
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"text": "ok", "label": "meh"}])
    result = run_cli("validate", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "row 1" in result.stderr and "negative, positive" in result.stderr
    with pytest.raises(LLMTuneError):
        split_samples(load_recipe(path))


# --- the builtin encoder ---------------------------------------------------------------------------


@pytest.mark.slow
@needs_minilm
def test_builtin_encoder_reads_the_shipped_recipe_as_a_classifier():
    recipe = load_recipe(RECIPES / "classify.yaml")
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    first = data.train[0]["input_ids"]
    assert (first[0], first[-1]) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    assert data.report["train"]["truncated"] == 0 and data.report["train"]["rows"] == 320
    model = load_base_model(recipe)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "positive"} and model.config.hidden_size == 384
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([first])).logits
    assert logits.shape == (1, 2)
    # Read from the package's files: none of its code runs (it declares sentence-transformers, which is not needed).
    assert MINILM_PACKAGE not in sys.modules
