"""Data loading, formatting, tokenizing and loss masking, checked token by token on the tiny tokenizer."""

from __future__ import annotations

import csv
import filecmp
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    REPO,
    assert_prompt_matches_training,
    chat_rows,
    convo,
    expect_error,
    loss_positions,
    loss_spans,
    loss_text,
    plain_ids,
    rendered,
    write_jsonl,
)

from llmtune.data import (
    IGNORE_INDEX,
    Sample,
    encode,
    encode_dataset,
    encode_prompt,
    load_samples,
    split_samples,
    to_sample,
)
from llmtune.models import load_tokenizer
from llmtune.recipe import DataSpec, load_recipe

QUICKSTART_DATA = REPO / "recipes" / "data" / "quickstart"


@pytest.fixture(scope="module")
def tok():
    """tiny:llama's tokenizer: one token per byte, BOS written by the template and added by the tokenizer."""
    return load_tokenizer("tiny:llama")


# --- helpers -------------------------------------------------------------------------------------


def spec(**fields: Any) -> DataSpec:
    return DataSpec(train="unused.jsonl", **fields)


# --- masking on the tiny tokenizer ---------------------------------------------------------------


def test_single_turn_loss_positions(tok):
    messages = convo("hi", "yo")
    ids, labels = encode(Sample(messages=messages), tok)
    text = rendered(tok, messages)
    assert text.startswith("<s>")  # the template writes BOS; the tokenizer would add another
    assert ids == plain_ids(tok, text)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1

    n_prompt = len(plain_ids(tok, rendered(tok, messages[:1], generation_prompt=True)))
    # "y", "o", EOS carry loss; everything before is prompt, the "\n" after the turn is not the response.
    assert loss_positions(labels) == [n_prompt, n_prompt + 1, n_prompt + 2]
    assert ids[n_prompt + 2] == tok.eos_token_id
    assert len(ids) == n_prompt + 4 and tok.decode(ids[n_prompt + 3 :]) == "\n"
    assert [labels[i] for i in loss_positions(labels)] == ids[n_prompt : n_prompt + 3]


@pytest.mark.parametrize("answer", ["yo", "2029-01-29", " leading space", "two\n\nlines", "héllo ✓ 日本"])
def test_loss_tokens_are_exactly_the_answer_and_eos(tok, answer):
    ids, labels = encode(Sample(messages=convo("Question?", answer)), tok)
    assert loss_text(tok, labels) == answer + tok.eos_token
    assert tok.eos_token_id in [labels[i] for i in loss_positions(labels)]
    first = loss_positions(labels)[0]
    assert all(label == IGNORE_INDEX for label in labels[:first])
    assert ids.count(tok.bos_token_id) == 1


def test_multi_turn_each_assistant_turn_carries_loss(tok):
    messages = convo("first question", "A1", "second question", "A2", system="Be brief.")
    ids, labels = encode(Sample(messages=messages), tok)
    assert ids == plain_ids(tok, rendered(tok, messages))
    (a_start, a_end), (b_start, b_end) = loss_spans(labels)
    assert tok.decode(ids[a_start:a_end]) == "A1<|im_end|>"
    assert tok.decode(ids[b_start:b_end]) == "A2<|im_end|>"
    # The user turn between the responses is context, not target.
    between = tok.decode(ids[a_end:b_start])
    assert between == "\n<|im_start|>user\nsecond question<|im_end|>\n<|im_start|>assistant\n"
    assert labels[a_end:b_start] == [IGNORE_INDEX] * (b_start - a_end)
    assert tok.decode(ids[:a_start]).startswith("<s><|im_start|>system\nBe brief.")


def test_conversation_opening_with_assistant_turn(tok):
    messages = [{"role": "assistant", "content": "Hi"}, *convo("q", "a")]
    ids, labels = encode(Sample(messages=messages), tok)
    assert [tok.decode(ids[a:b]) for a, b in loss_spans(labels)] == ["Hi<|im_end|>", "a<|im_end|>"]


def test_loss_on_all_labels_every_token(tok):
    ids, labels = encode(Sample(messages=convo("q", "a", "q2", "a2")), tok, loss_on="all")
    assert labels == ids


@pytest.mark.parametrize(
    "messages",
    [convo("hi", "yo"), convo("q1", "a1", "q2", "a2", system="S"), convo("ends with space ", "x")],
    ids=["single", "multi-turn", "trailing-space"],
)
def test_inference_prompt_equals_training_prefix(tok, messages):
    sample = Sample(messages=messages)
    assert sample.prompt_and_reference()[1] == messages[-1]["content"]
    assert_prompt_matches_training(sample, tok)
    prompt_ids = encode_prompt(sample.prompt_and_reference()[0], tok)
    assert prompt_ids.count(tok.bos_token_id) == 1
    assert tok.decode(prompt_ids).endswith("<|im_start|>assistant\n")


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "prompt"),
    [
        ({"instruction": "Add", "input": "1 2", "output": "3"}, "Add\n\n1 2"),
        ({"instruction": "Add", "input": "", "output": "3"}, "Add"),
        ({"instruction": "Add", "output": "3"}, "Add"),
    ],
)
def test_instruction_format(row, prompt):
    sample = to_sample(row, spec(format="instruction"), "f: row 1")
    assert sample.messages == convo(prompt, "3")


def test_prompt_completion_format():
    sample = to_sample({"prompt": "P?", "completion": "C."}, spec(format="prompt_completion"), "f: row 1")
    assert sample.messages == convo("P?", "C.")


def test_text_format(tok):
    sample = to_sample({"text": "plain words"}, spec(format="text"), "f: row 1")
    assert sample == Sample(segments=[("plain words", True)])
    assert sample.prompt_and_reference() is None
    ids, labels = encode(sample, tok, loss_on="all")
    assert ids == [tok.bos_token_id, *plain_ids(tok, "plain words"), tok.eos_token_id]
    assert labels == ids


def test_sharegpt_rows():
    turns = [("system", "S"), ("human", "Q"), ("gpt", "A")]
    row = {"messages": [{"from": who, "value": text} for who, text in turns]}
    assert to_sample(row, spec(), "f: row 1").messages == convo("Q", "A", system="S")


@pytest.mark.parametrize(
    ("fmt", "columns", "row", "messages"),
    [
        ("chat", {"messages": "conversations"}, {"conversations": convo("Q", "A")}, convo("Q", "A")),
        (
            "prompt_completion",
            {"prompt": "question", "completion": "answer"},
            {"question": "Q", "answer": "A"},
            convo("Q", "A"),
        ),
        (
            "instruction",
            {"output": "response", "input": "context"},
            {"instruction": "I", "context": "C", "response": "A"},
            convo("I\n\nC", "A"),
        ),
    ],
)
def test_column_mapping(fmt, columns, row, messages):
    data_spec = spec(format=fmt, columns=columns)
    assert to_sample(row, data_spec, "f: row 1").messages == messages


def test_system_prompt_is_context_only(tok):
    data_spec = spec(format="prompt_completion", system_prompt="You are terse.")
    sample = to_sample({"prompt": "Q", "completion": "A"}, data_spec, "f: row 1")
    assert sample.messages == convo("Q", "A", system="You are terse.")
    ids, labels = encode(sample, tok)
    assert loss_text(tok, labels) == "A" + tok.eos_token
    assert "You are terse." in tok.decode(ids)
    # A conversation that has its own system message keeps it and gets no second one.
    own = to_sample({"messages": convo("Q", "A", system="Mine")}, spec(system_prompt="Other"), "f: row 1")
    assert own.messages == convo("Q", "A", system="Mine")


@pytest.mark.parametrize("system_prompt", [None, "Sys: "])
def test_without_chat_template_text_is_concatenated(tok, system_prompt):
    data_spec = spec(format="prompt_completion", chat_template=False, system_prompt=system_prompt)
    sample = to_sample({"prompt": "Q: 2+2? A:", "completion": " 4"}, data_spec, "f: row 1")
    prefix = (system_prompt or "") + "Q: 2+2? A:"
    ids, labels = encode(sample, tok)
    assert ids == [tok.bos_token_id, *plain_ids(tok, prefix + " 4"), tok.eos_token_id]
    n_prompt = 1 + len(plain_ids(tok, prefix))
    assert loss_positions(labels) == list(range(n_prompt, len(ids)))
    assert loss_text(tok, labels) == " 4" + tok.eos_token
    assert_prompt_matches_training(sample, tok)


# --- loading files -------------------------------------------------------------------------------

INSTRUCTION_ROWS = [
    {"instruction": "Add the numbers", "input": "1 2", "output": "3"},
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Spell 'ok', with \"quotes\"", "input": "", "output": "o, k"},
]


def _write_json(directory: Path, rows: list[dict]) -> Path:
    path = directory / "rows.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def _write_csv(directory: Path, rows: list[dict]) -> Path:
    path = directory / "rows.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _write_parquet(directory: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    path = directory / "rows.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    return path


def _save_to_disk(directory: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(directory / "saved"))
    return directory / "saved"


def _save_dict_to_disk(directory: Path, rows: list[dict]) -> Path:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(directory / "saved"))
    return directory / "saved"


WRITERS: dict[str, Callable[[Path, list[dict]], Path]] = {
    ".json": _write_json,
    ".csv": _write_csv,
    ".parquet": _write_parquet,
    "save_to_disk": _save_to_disk,
    "save_to_disk (DatasetDict)": _save_dict_to_disk,
}


@pytest.mark.parametrize(
    ("fmt", "writer"),
    [("instruction", name) for name in WRITERS] + [("chat", name) for name in WRITERS if name != ".csv"],
)
def test_every_file_type_gives_the_same_samples(tmp_path, fmt, writer):
    rows = INSTRUCTION_ROWS if fmt == "instruction" else chat_rows(3)
    data_spec = spec(format=fmt)
    expected = load_samples(str(write_jsonl(tmp_path / "rows.jsonl", rows)), data_spec)
    assert len(expected) == len(rows)
    ref = WRITERS[writer](tmp_path, rows)
    assert load_samples(str(ref), data_spec) == expected


def _load_text(tmp_path: Path, text: str, fmt: str = "chat", name: str = "rows.jsonl") -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    load_samples(str(path), spec(format=fmt))


def test_bad_json_line_names_file_and_line(tmp_path):
    good = json.dumps(chat_rows(1)[0])
    with expect_error(f"{tmp_path / 'rows.jsonl'}:2: invalid JSON"):
        _load_text(tmp_path, f"{good}\n{{not json\n{good}\n")


@pytest.mark.parametrize(
    ("text", "fmt", "fragments"),
    [
        ('{"prompt": "p", "completion": "c"}\n', "instruction", ("column 'instruction' not found", "'instruction'")),
        ('{"text": "t"}\n', "chat", ("column 'messages' not found", "columns are text")),
        ("", "chat", ("the dataset is empty",)),
        ("\n\n", "chat", ("the dataset is empty",)),
    ],
)
def test_bad_dataset_names_the_file(tmp_path, text, fmt, fragments):
    with expect_error(str(tmp_path / "rows.jsonl"), *fragments):
        _load_text(tmp_path, text, fmt)


@pytest.mark.parametrize(
    ("bad_row", "fmt", "fragment"),
    [
        ({"messages": convo("q")}, "chat", "no assistant message"),
        ({"messages": convo("q", "  ")}, "chat", "empty assistant message"),
        ({"prompt": "p", "completion": ""}, "prompt_completion", "column 'completion' is empty"),
        ({"prompt": "p"}, "prompt_completion", "column 'completion' is empty"),
        ({"instruction": "i", "output": None}, "instruction", "column 'output' is empty"),
        ({"messages": "not a list"}, "chat", "non-empty list"),
    ],
)
def test_bad_row_names_file_and_row(tmp_path, bad_row, fmt, fragment):
    good = {
        "chat": {"messages": convo("q", "a")},
        "prompt_completion": {"prompt": "p", "completion": "c"},
        "instruction": {"instruction": "i", "output": "o"},
    }[fmt]
    rows = [good, good, bad_row]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with expect_error(f"{path}: row 3", fragment):
        load_samples(str(path), spec(format=fmt))


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("prompt,completion\nQ,A\n".encode("utf-8-sig"))
    assert load_samples(str(path), spec(format="prompt_completion")) == [Sample(messages=convo("Q", "A"))]


def test_empty_csv_and_mapped_missing_column(tmp_path):
    with expect_error(str(tmp_path / "rows.csv"), "the dataset is empty"):
        _load_text(tmp_path, "prompt,completion\n", "prompt_completion", "rows.csv")
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "completion": "c"}])
    with expect_error(str(path), "column 'question' (mapped from 'prompt') not found"):
        load_samples(str(path), spec(format="prompt_completion", columns={"prompt": "question"}))


# --- length limits -------------------------------------------------------------------------------


def _length_samples(tok) -> tuple[list[Sample], int]:
    """Three rows: one that fits, one whose response is cut, one whose prompt alone is too long."""
    short = Sample(messages=convo("q", "a"))
    long_answer = Sample(messages=convo("q", "a much longer answer"))
    long_prompt = Sample(messages=convo("q" * 80, "a"))
    max_length = len(encode(short, tok)[0])
    return [short, long_answer, long_prompt], max_length


def test_overflow_truncate(tok):
    samples, max_length = _length_samples(tok)
    dataset, counts = encode_dataset(samples, tok, spec(max_length=max_length, overflow="truncate"), "response", "src")
    full_ids, full_labels = encode(samples[1], tok)
    # The long-prompt row would keep no response token, so it is dropped even when truncating.
    assert (counts["rows"], counts["truncated"], counts["dropped"]) == (2, 1, 1)
    assert dataset["input_ids"] == [encode(samples[0], tok)[0], full_ids[:max_length]]
    assert dataset["labels"][1] == full_labels[:max_length]
    assert counts["tokens"] == 2 * max_length
    assert counts["loss_tokens"] == sum(len(loss_positions(lab)) for lab in dataset["labels"])


def test_overflow_drop(tok):
    samples, max_length = _length_samples(tok)
    dataset, counts = encode_dataset(samples, tok, spec(max_length=max_length, overflow="drop"), "response", "src")
    assert (counts["rows"], counts["truncated"], counts["dropped"]) == (1, 0, 2)
    assert dataset["input_ids"] == [encode(samples[0], tok)[0]]
    assert counts["loss_tokens"] == len("a") + 1  # the answer byte and EOS


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_every_row_too_long_is_an_error(tok, overflow):
    samples, _ = _length_samples(tok)
    with expect_error("train.jsonl", "every row is longer than data.max_length=5"):
        encode_dataset(samples, tok, spec(max_length=5, overflow=overflow), "response", "train.jsonl")


# --- batching: EOS stays in the loss when pad == eos ---------------------------------------------


def test_eos_label_survives_trl_collator(tok):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    assert tok.pad_token_id == tok.eos_token_id
    rows = [encode(Sample(messages=convo("q" * (3 * i + 1), "a" * (4 - i))), tok) for i in range(3)]
    assert len({len(ids) for ids, _ in rows}) == 3
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(
        [{"input_ids": ids, "labels": labels} for ids, labels in rows]
    )
    width = batch["input_ids"].shape[1]
    for i, (ids, labels) in enumerate(rows):
        n = len(ids)
        row_labels = batch["labels"][i].tolist()
        assert row_labels[:n] == labels
        eos_position = loss_positions(labels)[-1]
        assert ids[eos_position] == tok.eos_token_id and row_labels[eos_position] == tok.eos_token_id
        assert row_labels[n:] == [IGNORE_INDEX] * (width - n)
        assert batch["input_ids"][i, n:].tolist() == [tok.pad_token_id] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)


# --- held-out split ------------------------------------------------------------------------------


def _split(make_recipe, tmp_path: Path, seed: int):
    path = make_recipe(data={"train": "data/unique.jsonl", "eval_split": 0.25}, training={"seed": seed})
    rows = [{"messages": convo(f"question {i}", f"answer {i}")} for i in range(40)]
    write_jsonl(tmp_path / "data" / "unique.jsonl", rows)
    return split_samples(load_recipe(path))


def _questions(samples: list[Sample]) -> list[str]:
    return [s.messages[0]["content"] for s in samples]


def test_eval_split_is_disjoint_and_deterministic(make_recipe, tmp_path):
    train, held_out = _split(make_recipe, tmp_path, seed=0)
    assert (len(train), len(held_out)) == (30, 10)
    assert not set(_questions(train)) & set(_questions(held_out))
    assert sorted(_questions(train) + _questions(held_out)) == sorted(f"question {i}" for i in range(40))
    again = _split(make_recipe, tmp_path, seed=0)
    assert (_questions(again[0]), _questions(again[1])) == (_questions(train), _questions(held_out))
    assert _questions(_split(make_recipe, tmp_path, seed=1)[1]) != _questions(held_out)


# --- the quickstart dataset ----------------------------------------------------------------------


def test_quickstart_data_is_reproducible(tmp_path):
    subprocess.run([sys.executable, str(QUICKSTART_DATA / "make_data.py"), str(tmp_path)], check=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert filecmp.cmp(tmp_path / name, QUICKSTART_DATA / name, shallow=False), name


def test_quickstart_train_and_eval_prompts_do_not_overlap():
    def prompts(name: str) -> list[str]:
        lines = (QUICKSTART_DATA / name).read_text(encoding="utf-8").splitlines()
        return [json.loads(line)["messages"][0]["content"] for line in lines]

    train, held_out = prompts("train.jsonl"), prompts("eval.jsonl")
    assert (len(train), len(held_out)) == (480, 64)
    assert not set(train) & set(held_out)
