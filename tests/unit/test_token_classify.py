"""Objective token-classify: the tags data format, labels on first sub-tokens only, the head per model and method,
and the scores (seqeval entities, per-tag macro) recomputed by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import RECIPES, expect_error, needs_minilm, save_recipe, write_jsonl

from llmtune import metrics
from llmtune.data import IGNORE_INDEX, Sample, encode_token_classification, split_samples
from llmtune.methods import METHODS, PEFT_TASK_TYPES
from llmtune.models import load_base_model, load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.recipe import DataSpec, load_recipe

NER = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]


def write_tagging_recipe(root: Path, model: str = "tiny:bert", labels: list[str] = NER, **objective: Any) -> Path:
    rows = [{"tokens": ["on", "Ada", "Lee", "saw", "Rome"], "tags": ["O", "B-PER", "I-PER", "O", "B-LOC"]}] * 4
    write_jsonl(root / "data" / "train.jsonl", rows)
    write_jsonl(root / "data" / "eval.jsonl", rows[:2])
    recipe = {
        "model": model,
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "token-classify", "labels": labels, **objective},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "token_classification"},
        "training": {"max_steps": 2, "batch_size": 2, "seed": 0},
        "output": {"dir": str(root / "runs" / "tag")},
    }
    return save_recipe(root, "tag", recipe)


# --- labels at first sub-tokens --------------------------------------------------------------------


def data_spec(**fields: Any) -> DataSpec:
    return DataSpec(train="train.jsonl", format="token_classification", **fields)


def encode_words(words: list[str], tags: list[str], max_length: int = 64):
    sample = Sample(segments=[(" ".join(words), False)], words=words, tags=tags)
    return encode_token_classification(
        [sample], load_tokenizer("tiny:bert"), data_spec(max_length=max_length), NER, "r"
    )


def test_each_word_is_labelled_at_its_first_sub_token_only():
    # The tiny tokenizer gives one token per byte after its BOS, so "Ada" is 3 sub-tokens, "Lee" 3, "on" 2.
    dataset, counts = encode_words(["on", "Ada", "Lee"], ["O", "B-PER", "I-PER"])
    tokenizer = load_tokenizer("tiny:bert")
    [ids], [labels] = dataset["input_ids"], dataset["labels"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<s>", "o", "n", "A", "d", "a", "L", "e", "e"]
    x = IGNORE_INDEX
    assert labels == [x, 0, x, 1, x, x, 2, x, x]  # BOS (a special token) and every later sub-token: -100
    assert counts["labels"] == {"O": 1, "B-PER": 1, "I-PER": 1, "B-LOC": 0, "I-LOC": 0}
    assert counts["cut_words"] == 0 and counts["truncated"] == 0


def test_truncation_drops_trailing_words_and_counts_them():
    # 5 tokens keep "on" and the first two bytes of "Ada": Ada keeps its tag, Lee and Rome are cut.
    dataset, counts = encode_words(["on", "Ada", "Lee", "Rome"], ["O", "B-PER", "I-PER", "B-LOC"], max_length=5)
    x = IGNORE_INDEX
    assert dataset["labels"] == [[x, 0, x, 1, x]]
    assert (counts["truncated"], counts["cut_words"], counts["rows"]) == (1, 2, 1)


def test_overflow_drop_drops_the_long_row():
    spec = data_spec(max_length=5, overflow="drop")
    short = Sample(segments=[("on", False)], words=["on"], tags=["O"])
    long = Sample(segments=[("on Ada", False)], words=["on", "Ada"], tags=["O", "B-PER"])
    dataset, counts = encode_token_classification([short, long], load_tokenizer("tiny:bert"), spec, NER, "r")
    assert dataset["labels"] == [[IGNORE_INDEX, 0, IGNORE_INDEX]] and counts["dropped"] == 1


def test_a_slow_tokenizer_is_refused_in_one_line():
    class Slow:
        is_fast = False
        name_or_path = "slow-tok"

    sample = Sample(segments=[("on", False)], words=["on"], tags=["O"])
    with expect_error("tokenizer 'slow-tok'", "fast", "objective token-classify"):
        encode_token_classification([sample], Slow(), data_spec(), NER, "r")


# --- bad rows --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ({"tokens": ["on", "Ada"], "tags": ["O"]}, ["2 tokens but 1 tags", "one tag per word"]),
        ({"tokens": ["on", "Ada"], "tags": ["O", "B-ORG"]}, ["tags[1] 'B-ORG'", "not one of objective.labels"]),
        ({"tokens": [], "tags": []}, ["column 'tokens' must be a non-empty list of words"]),
        ({"tokens": ["on", 7], "tags": ["O", "O"]}, ["tokens[1] is 7, not a word"]),
        ({"tokens": ["on", " "], "tags": ["O", "O"]}, ["tokens[1] is ' ', not a word"]),
        ({"tokens": "on Ada", "tags": ["O", "O"]}, ["column 'tokens' must be a non-empty list"]),
        ({"tokens": ["on"], "tags": "O"}, ["column 'tags' must be a list of tags"]),
    ],
)
def test_a_bad_row_is_named_by_file_and_row(tmp_path: Path, row: dict[str, Any], fragments: list[str]):
    path = write_tagging_recipe(tmp_path)
    good = {"tokens": ["on"], "tags": ["O"]}
    write_jsonl(tmp_path / "data" / "train.jsonl", [good, good, row])
    with expect_error("train.jsonl: row 3", *fragments):
        split_samples(load_recipe(path))


def test_tags_by_name_or_index_become_names(tmp_path: Path):
    path = write_tagging_recipe(tmp_path)
    write_jsonl(tmp_path / "data" / "train.jsonl", [{"tokens": ["Ada", "Lee"], "tags": [1, "I-PER"]}])
    [sample], _ = split_samples(load_recipe(path, ["data.eval=null", "data.eval_split=0"]))
    assert (sample.words, sample.tags) == (["Ada", "Lee"], ["B-PER", "I-PER"])


# --- recipe rules ----------------------------------------------------------------------------------


def test_scheme_defaults_from_the_labels(tmp_path: Path):
    assert load_recipe(write_tagging_recipe(tmp_path)).objective.scheme == "iob2"
    pos = load_recipe(write_tagging_recipe(tmp_path, labels=["NOUN", "VERB"]))
    assert pos.objective.scheme == "none"
    assert pos.eval.metrics == ["accuracy", "precision", "recall", "f1"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("objective.labels=[O, NOUN]", "scheme iob2: labels NOUN are not O, B-TYPE or I-TYPE"),
        ("data.format=chat", "objective token-classify reads data.format: token_classification"),
        ("data.packing=true", "data.packing: a tagger reads one sentence per sequence"),
        ("objective.labels=[O, O]", "O listed more than once"),
        ("eval.metrics=[bleu]", "bleu do not apply to objective token-classify"),
    ],
)
def test_recipe_refuses_what_token_classify_cannot_do(tmp_path: Path, override: str, fragment: str):
    with expect_error(fragment):
        load_recipe(write_tagging_recipe(tmp_path, scheme="iob2"), [override])


# --- the head --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "cls", "head"), [("tiny:bert", "Bert", "classifier"), ("tiny:llama", "Llama", "score")]
)
def test_labels_map_onto_a_token_head_that_lora_trains_in_full(tmp_path: Path, model: str, cls: str, head: str):
    recipe = load_recipe(write_tagging_recipe(tmp_path, model=model), ["method.target_modules=all-linear"])
    base = load_base_model(recipe)
    assert type(base).__name__ == f"{cls}ForTokenClassification"
    assert base.config.id2label == dict(enumerate(NER)) and base.config.label2id == {n: i for i, n in enumerate(NER)}
    tuned = METHODS["lora"](recipe.method, base, None, task_type=PEFT_TASK_TYPES[recipe.objective.model_kind])
    names = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert f"base_model.model.{head}.modules_to_save.default.weight" in names
    assert not any(f"{head}." in n and "lora_" in n for n in names)  # the head trains in full, without LoRA
    assert any("lora_A" in n for n in names)


def test_head_method_trains_the_token_head_only(tmp_path: Path):
    recipe = load_recipe(write_tagging_recipe(tmp_path), ["method={name: head}"])
    model = METHODS["head"](recipe.method, load_base_model(recipe), None, task_type="TOKEN_CLS")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}


# --- scores by hand --------------------------------------------------------------------------------

# Two sentences. Reference entities: PER(0-1), LOC(3) in the first; ORG(1-2), PER(4) in the second: 4 in all.
REFERENCE = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O", "B-PER"]]
PREDICTED = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "O", "O", "I-PER"]]


def test_iob2_entities_by_hand():
    # Strict IOB2: predicted PER(0-1) (right) and ORG(1) (span too short); the I-PER after O starts no entity.
    # precision 1/2, recall 1/4, F1 2 * 0.5 * 0.25 / 0.75 = 1/3.
    scores = metrics.entity_scores(PREDICTED, REFERENCE, "iob2")
    assert scores == pytest.approx({"precision": 50.0, "recall": 25.0, "f1": 100 / 3})


def test_iob1_entities_by_hand():
    # conlleval's rules: the I-PER after O starts an entity, PER(4), which is right: 2 right of 3 predicted, of 4.
    scores = metrics.entity_scores(PREDICTED, REFERENCE, "iob1")
    assert scores == pytest.approx(
        {"precision": 200 / 3, "recall": 50.0, "f1": 100 * 2 * (2 / 3) * 0.5 / (2 / 3 + 0.5)}
    )


def test_no_entity_predicted_scores_zero():
    assert metrics.entity_scores([["O", "O"]], [["B-PER", "O"]], "iob2") == {"precision": 0, "recall": 0, "f1": 0}


def test_per_tag_macro_scores_by_hand():
    predicted = [0, 0, 1, 1, 2, 0]
    reference = [0, 1, 1, 1, 2, 2]
    # Tag 0: tp 1 of 3 predicted, 1 present -> P 1/3, R 1, F1 1/2. Tag 1: 2 of 2, 3 -> P 1, R 2/3, F1 4/5.
    # Tag 2: 1 of 1, 2 -> P 1, R 1/2, F1 2/3. Tag 3: never predicted nor present -> 0, 0, 0.
    scores = metrics.macro_scores(predicted, reference, 4)
    assert scores == pytest.approx(
        {
            "precision": 100 * (1 / 3 + 1 + 1) / 4,
            "recall": 100 * (1 + 2 / 3 + 1 / 2) / 4,
            "f1": 100 * (0.5 + 0.8 + 2 / 3) / 4,
        }
    )


@pytest.mark.slow
@needs_minilm
def test_builtin_encoder_labels_first_word_pieces_and_reads_the_shipped_recipe():
    recipe = load_recipe(RECIPES / "pos-tagging.yaml")
    tokenizer = load_tokenizer(recipe.model)
    labels = recipe.objective.labels
    sample = Sample(segments=[("", False)], words=["Ada", "Lovelace", "."], tags=["NOUN", "NOUN", "PUNCT"])
    dataset, _ = encode_token_classification([sample], tokenizer, recipe.data, labels, "r")
    [ids], [row] = dataset["input_ids"], dataset["labels"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "ada", "love", "##lace", ".", "[SEP]"]
    noun, punct, x = labels.index("NOUN"), labels.index("PUNCT"), IGNORE_INDEX
    assert row == [x, noun, noun, x, punct, x]  # [CLS], ##lace and [SEP] carry no label
    data = prepare_data(recipe, tokenizer)
    assert data.report["train"]["rows"] == 400 and data.report["train"]["cut_words"] == 0
    assert data.report["eval"]["rows"] == 100
    model = load_base_model(recipe)
    assert type(model).__name__ == "BertForTokenClassification" and model.config.id2label == dict(enumerate(labels))
