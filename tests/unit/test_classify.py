"""Objective classify: labels, the classification data format, heads per method, accuracy and macro-F1.

End to end on tiny:llama: `finetune` through the real CLI once per module, then eval, merge-adapter and
generate through the library calls those commands make. tiny:bert covers encoders, head-only and BitFit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import expect_error, review_rows, write_classify_recipe, write_jsonl

from llmtune import metrics
from llmtune.data import split_samples
from llmtune.methods import METHODS, PEFT_TASK_TYPES
from llmtune.models import load_base_model, load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.recipe import load_recipe
from llmtune.run import finetune

# --- metrics ---------------------------------------------------------------------------------------


def test_accuracy_and_macro_f1_by_hand():
    predicted = [0, 0, 1, 1, 2, 0]
    reference = [0, 1, 1, 1, 2, 2]
    assert metrics.accuracy(predicted, reference) == pytest.approx(100 * 4 / 6)
    # Class 0: tp 1, predicted 3, actual 1 -> 2/4. Class 1: tp 2, 2, 3 -> 4/5. Class 2: tp 1, 1, 2 -> 2/3.
    assert metrics.macro_f1(predicted, reference, 3) == pytest.approx(100 * (0.5 + 0.8 + 2 / 3) / 3)
    # A class that is neither predicted nor present counts as 0, so always guessing one class is penalised.
    assert metrics.macro_f1([0, 0], [0, 0], 2) == pytest.approx(50.0)


# --- recipe and data -------------------------------------------------------------------------------


def test_labels_map_onto_the_model_head(tmp_path: Path):
    recipe = load_recipe(write_classify_recipe(tmp_path))
    model = load_base_model(recipe)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 2
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    assert model.config.pad_token_id == load_tokenizer("tiny:llama").pad_token_id
    assert recipe.eval.metrics == ["accuracy", "f1"]


def test_labels_by_name_or_index_from_renamed_csv_columns(tmp_path: Path):
    rows = "review,stars\nawful film,negative\nlovely film,1\nfine film,0\n"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text(rows, encoding="utf-8")
    data = {"train": "data/train.csv", "format": "classification", "columns": {"text": "review", "label": "stars"}}
    recipe = load_recipe(write_classify_recipe(tmp_path), [f"data={json.dumps(data)}", "data.eval_split=0"])
    train, _ = split_samples(recipe)
    assert [(s.segments[0][0], s.label) for s in train] == [("awful film", 0), ("lovely film", 1), ("fine film", 0)]

    prepared = prepare_data(recipe, load_tokenizer("tiny:llama"))
    assert prepared.train["labels"] == [0, 1, 0]
    assert prepared.report["train"]["labels"] == {"negative": 2, "positive": 1}


def test_a_label_outside_the_list_fails_before_training_naming_file_row_and_labels(tmp_path: Path):
    path = write_classify_recipe(tmp_path)
    rows = review_rows(5, seed=0)
    rows[2]["label"] = "neutral"
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    with expect_error("train.jsonl: row 3", "'neutral'", "negative, positive", "objective.labels"):
        finetune(path)
    assert not (tmp_path / "runs" / "cls").exists()  # nothing was written, no model was loaded


@pytest.mark.parametrize("label", [2, -1, True, None, ""])
def test_out_of_range_and_non_label_values_are_refused(tmp_path: Path, label):
    path = write_classify_recipe(tmp_path)
    write_jsonl(tmp_path / "data" / "eval.jsonl", [{"text": "so so", "label": label}])
    with expect_error("eval.jsonl: row 1", "not one of objective.labels"):
        split_samples(load_recipe(path))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.format=chat", "data.format: objective classify reads data.format: classification"),
        ("objective={name: sft}", "that format is only for objective classify"),
        ("objective.labels=[good, bad, good]", "objective.labels: good listed more than once"),
        ("objective.labels=[only]", "objective.labels"),
        ("eval.metrics=[accuracy, bleu]", "eval.metrics: bleu do not apply to objective classify"),
    ],
)
def test_recipe_refuses_what_classify_cannot_do(tmp_path: Path, override: str, fragment: str):
    with expect_error(fragment):
        load_recipe(write_classify_recipe(tmp_path), [override])


# --- methods on a classifier -----------------------------------------------------------------------


def trainable(recipe_path: Path, overrides: list[str]) -> set[str]:
    recipe = load_recipe(recipe_path, overrides)
    model = load_base_model(recipe)
    model = METHODS[recipe.method.name](
        recipe.method, model, None, task_type=PEFT_TASK_TYPES[recipe.objective.model_kind]
    )
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(("model", "head"), [("tiny:llama", "score"), ("tiny:bert", "classifier")])
def test_head_method_picks_the_classification_head(tmp_path: Path, model: str, head: str):
    names = trainable(write_classify_recipe(tmp_path, model=model), ["method={name: head}"])
    assert names and all(n.startswith(f"{head}.") for n in names), names


def test_bitfit_and_layers_also_train_the_new_head(tmp_path: Path):
    path = write_classify_recipe(tmp_path, model="tiny:bert")
    bitfit = trainable(path, ["method={name: bitfit}"])
    assert "classifier.weight" in bitfit and "bert.encoder.layer.0.attention.self.query.bias" in bitfit
    assert all(n.endswith(".bias") or n.startswith("classifier.") for n in bitfit)
    layers = trainable(path, ["method={name: layers, last_k: 1}"])
    assert {n.split(".")[0] for n in layers} == {"bert", "classifier"}
    assert not any(".layer.0." in n for n in layers)


@pytest.mark.parametrize("method", ["{name: lora, r: 4}", "{name: dora, r: 4}", "{name: ia3}"])
def test_adapters_keep_the_new_head_trainable(tmp_path: Path, method: str):
    names = trainable(write_classify_recipe(tmp_path, model="tiny:bert"), [f"method={method}"])
    assert any("classifier.modules_to_save" in n for n in names), sorted(names)
    assert not any("word_embeddings" in n for n in names)
