"""Dataset mixtures: a list of sources in data.train / data.eval, mixed by weight or count, held out source by
source, counted source by source, and named by index and path in every error.

Each source's rows say where they come from (`a question 3`), so a mixture can be taken apart again.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    RECIPES,
    convo,
    expect_error,
    save_recipe,
    write_classify_recipe,
    write_grpo_recipe,
    write_jsonl,
    write_lm_recipe,
    write_preference_recipe,
    write_s2s_recipe,
)
from typer.testing import CliRunner

from llmtune.cli.app import app
from llmtune.data import Sample, load_splits, split_samples
from llmtune.models import load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.preview import build_preview
from llmtune.recipe import dump_recipe, load_recipe

COUNTED = ("rows", "tokens", "loss_tokens", "truncated", "dropped")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny:llama")


def chat(tag: str, n: int, long_from: int | None = None) -> list[dict[str, Any]]:
    """Chat rows tagged with their source; rows from `long_from` on have answers longer than max_length."""
    answer = lambda i: f"{tag} answer {i}" + (" and more" * 20 if long_from is not None and i >= long_from else "")  # noqa: E731
    return [{"messages": convo(f"{tag} question {i}", answer(i))} for i in range(n)]


def tag_of(sample: Sample) -> str:
    return sample.messages[0]["content"].split()[0]


def question(sample: Sample) -> str:
    return sample.messages[0]["content"]


def mixture(root: Path, train: Any, name: str = "mix", **data: Any) -> Path:
    """A tiny:llama sft recipe over `train`; a.jsonl (40 rows) and b.jsonl (20) are there to name."""
    write_jsonl(root / "data" / "a.jsonl", chat("a", 40))
    write_jsonl(root / "data" / "b.jsonl", chat("b", 20))
    seed = data.pop("seed", 0)
    recipe = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": train, "max_length": 96, **data},
        "training": {"max_steps": 2, "batch_size": 4, "seed": seed, "logging_steps": 1},
    }
    return save_recipe(root, name, recipe)


# --- lists of paths and held-out rows ------------------------------------------------------------------------


def test_a_list_of_paths_takes_every_row_of_each_source_and_holds_out_from_each(tmp_path):
    recipe = load_recipe(mixture(tmp_path, ["data/a.jsonl", "data/b.jsonl"], eval_split=0.25))
    # Keys a source leaves out come from the data section.
    assert [(s.format, s.columns, s.split) for _, _, s in recipe.data.sources("train")] == [("chat", {}, "train")] * 2
    train, held_out = split_samples(recipe)
    assert Counter(map(tag_of, train)) == {"a": 30, "b": 15}
    assert Counter(map(tag_of, held_out)) == {"a": 10, "b": 5}  # every source is evaluated
    assert not set(map(question, train)) & set(map(question, held_out))
    # Held-out rows are spread through the split, so a prefix of it (eval.max_examples) samples both sources.
    assert {tag_of(s) for s in held_out[:3]} == {"a", "b"}
    other_seed = split_samples(
        load_recipe(mixture(tmp_path, ["data/a.jsonl", "data/b.jsonl"], eval_split=0.25, seed=1))
    )
    assert set(map(question, other_seed[1])) != set(map(question, held_out))


def test_a_plain_string_is_one_source_split_as_before(tmp_path, tok):
    plain = load_recipe(mixture(tmp_path, "data/a.jsonl", name="plain", eval_split=0.25))
    assert "train: " + str(tmp_path / "data" / "a.jsonl") in dump_recipe(plain)  # stays a string in the run's recipe
    train, held_out = split_samples(plain)
    # The held-out rows drawn as before mixtures existed: one shuffle by training.seed.
    order = list(range(40))
    random.Random(0).shuffle(order)
    assert sorted(map(question, held_out)) == sorted(f"a question {i}" for i in order[:10])
    data = prepare_data(plain, tok)
    assert set(data.report["train"]) == {"rows", "tokens", "loss_tokens", "truncated", "dropped"}  # no "sources"
    listed = load_recipe(mixture(tmp_path, ["data/a.jsonl"], name="listed", eval_split=0.25))
    assert split_samples(listed) == (train, held_out)
    assert prepare_data(listed, tok).fingerprint == data.fingerprint


# --- weights -------------------------------------------------------------------------------------------------


def test_weighted_mixture_is_seeded_and_keeps_the_proportions(tmp_path):
    write_jsonl(tmp_path / "data" / "big_a.jsonl", chat("a", 400))
    write_jsonl(tmp_path / "data" / "big_b.jsonl", chat("b", 400))
    weighted = [{"path": "data/big_a.jsonl", "weight": 3}, {"path": "data/big_b.jsonl", "weight": 1}]

    def mixed(seed: int, stop: str = "first_exhausted") -> list[Sample]:
        path = mixture(tmp_path, weighted, name=f"w{seed}{stop}", eval_split=0, seed=seed, mix_stop=stop)
        return split_samples(load_recipe(path))[0]

    first = mixed(0)
    tags = Counter(map(tag_of, first))
    # first_exhausted: the mix ends when a's 400 rows are drawn, each once; b fills about a quarter.
    assert tags["a"] == 400 and len(set(map(question, first))) == len(first)
    assert abs(tags["b"] / len(first) - 0.25) < 0.05
    assert [tag_of(s) for s in first[:40]].count("b") not in (0, 40)  # interleaved, not one source after the other
    assert mixed(0) == first
    other = mixed(1)
    assert [question(s) for s in other] != [question(s) for s in first]
    # all_exhausted: it ends when b's 400 rows are drawn too; a repeats, the shares stay.
    everything = mixed(0, "all_exhausted")
    tags = Counter(map(tag_of, everything))
    assert len({question(s) for s in everything if tag_of(s) == "b"}) == 400
    assert tags["a"] > 400 and abs(tags["b"] / len(everything) - 0.25) < 0.05


def test_weights_go_on_every_source_or_none(tmp_path):
    with expect_error("data.train[1] (data/b.jsonl)", "no weight", "data.train[0] has one"):
        load_recipe(mixture(tmp_path, [{"path": "data/a.jsonl", "weight": 1}, {"path": "data/b.jsonl", "count": 5}]))
    with expect_error("data.train[0]", "data/a.jsonl", "not both"):
        load_recipe(mixture(tmp_path, [{"path": "data/a.jsonl", "weight": 1, "count": 5}]))
    with expect_error("data.train[0]", "replace: true", "count"):
        load_recipe(mixture(tmp_path, [{"path": "data/a.jsonl", "replace": True}]))


# --- counts --------------------------------------------------------------------------------------------------


def test_count_takes_exactly_n_rows_repeating_only_with_replace(tmp_path):
    sources = [{"path": "data/a.jsonl", "count": 25}, {"path": "data/b.jsonl", "count": 50, "replace": True}]
    train, _ = split_samples(load_recipe(mixture(tmp_path, sources, eval_split=0)))
    a = [question(s) for s in train if tag_of(s) == "a"]
    b = Counter(question(s) for s in train if tag_of(s) == "b")
    assert len(a) == len(set(a)) == 25
    assert sum(b.values()) == 50 and set(b.values()) == {2, 3} and len(b) == 20  # whole passes, then a draw
    again = split_samples(load_recipe(mixture(tmp_path, sources, name="again", eval_split=0, seed=1)))[0]
    assert {question(s) for s in again if tag_of(s) == "a"} != set(a)
    # Without replace, a count over the rows left for training (20, less the held-out 2) is refused.
    too_many = mixture(tmp_path, ["data/a.jsonl", {"path": "data/b.jsonl", "count": 19}])
    with expect_error("data.train[1]", str(tmp_path / "data" / "b.jsonl"), "count 19", "18 training rows", "replace"):
        load_splits(load_recipe(too_many))


# --- sample kinds --------------------------------------------------------------------------------------------


def test_sources_of_other_formats_that_give_conversations_mix(tmp_path):
    write_jsonl(tmp_path / "data" / "inst.jsonl", [{"instruction": "i question 0", "output": "i answer"}] * 4)
    write_jsonl(tmp_path / "data" / "pc.jsonl", [{"q": "p question 0", "a": "p answer"}] * 4)
    sources = [
        "data/a.jsonl",
        {"path": "data/inst.jsonl", "format": "instruction"},
        {"path": "data/pc.jsonl", "format": "prompt_completion", "columns": {"prompt": "q", "completion": "a"}},
    ]
    train, _ = split_samples(load_recipe(mixture(tmp_path, sources, eval_split=0)))
    assert Counter(map(tag_of, train)) == {"a": 40, "i": 4, "p": 4}
    assert all(s.messages[-1]["role"] == "assistant" for s in train)


def test_a_source_of_another_kind_of_sample_is_refused_by_name(tmp_path):
    write_jsonl(tmp_path / "data" / "text.jsonl", [{"text": "plain words"}] * 4)
    with expect_error("data.train[1] (data/text.jsonl)", "format text", "data.format chat", "same kind"):
        load_recipe(mixture(tmp_path, ["data/a.jsonl", {"path": "data/text.jsonl", "format": "text"}]))
    pairs = write_preference_recipe(
        tmp_path, data={"train": ["data/train.jsonl", {"path": "data/text.jsonl", "format": "text"}]}
    )
    with expect_error("data.train[1] (data/text.jsonl)", "format text", "data.format preference"):
        load_recipe(pairs)
    sources = ["data/train.jsonl", {"path": "data/a.jsonl", "format": "chat"}]
    targets = write_s2s_recipe(tmp_path, data={"train": sources, "format": "prompt_completion"})
    with expect_error("data.train[1] (data/a.jsonl)", "seq2seq", "instruction or prompt_completion"):
        load_recipe(targets)


# --- errors name the source ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ["extra.jsonl", "data.train[1] file not found"]),
        ('{"messages": []}\n{oops\n', ["data.train[1]", "extra.jsonl:2", "invalid JSON"]),
        ('{"conversations": []}\n', ["data.train[1] (", "extra.jsonl)", "column 'messages'", "data.train[1].columns"]),
        (
            "".join(json.dumps(r) + "\n" for r in chat("x", 2))
            + '{"messages": [{"role": "user", "content": "no answer"}]}\n',
            ["data.train[1] (", "extra.jsonl): row 3", "no assistant message"],
        ),
    ],
    ids=["missing", "invalid-json", "column", "row"],
)
def test_a_bad_source_is_named_by_index_and_path(tmp_path, content, fragments):
    if content is not None:
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / "extra.jsonl").write_text(content, encoding="utf-8")
    with expect_error(*fragments):
        load_splits(load_recipe(mixture(tmp_path, ["data/a.jsonl", "data/extra.jsonl"])))


def test_schema_errors_in_a_source_name_its_index(tmp_path):
    with expect_error("data.train[1].weight", "greater than 0"):
        load_recipe(mixture(tmp_path, [{"path": "data/a.jsonl", "weight": 1}, {"path": "data/b.jsonl", "weight": -1}]))
    with expect_error("data.train[0].wieght: unknown key; did you mean 'weight'?"):
        load_recipe(mixture(tmp_path, [{"path": "data/a.jsonl", "wieght": 1}]))


# --- counts per source ---------------------------------------------------------------------------------------


def assert_sources_add_up(counts: dict[str, Any], keys: list[str]) -> None:
    sources = counts["sources"]
    assert list(sources) == keys
    for name, value in counts.items():
        if name != "sources":
            expected = Counter() if isinstance(value, dict) else 0
            for source in sources.values():
                expected += Counter(source[name]) if isinstance(value, dict) else source[name]
            assert (dict(expected) if isinstance(value, dict) else expected) == value, name


def test_per_source_counts_add_up_to_the_totals(tmp_path, tok):
    write_jsonl(tmp_path / "data" / "long.jsonl", chat("l", 20, long_from=14))
    sources = ["data/a.jsonl", "data/long.jsonl"]
    for overflow in ("drop", "truncate"):
        recipe = load_recipe(mixture(tmp_path, sources, name=overflow, overflow=overflow, eval_split=0.25))
        data = prepare_data(recipe, tok)
        for split, dataset in (("train", data.train), ("eval", data.eval)):
            counts = data.report[split]
            assert_sources_add_up(counts, ["data.train[0]", "data.train[1]"])
            assert counts["rows"] == len(dataset)
            assert counts["sources"]["data.train[1]"]["path"] == str(tmp_path / "data" / "long.jsonl")
        cut = data.report["train"]["sources"]["data.train[1]"]
        assert cut["dropped" if overflow == "drop" else "truncated"] > 0
        assert data.report["train"]["sources"]["data.train[0]"]["dropped"] == 0
        assert set(data.sources) == {
            f"data.train[0] ({tmp_path / 'data' / 'a.jsonl'})",
            f"data.train[1] ({tmp_path / 'data' / 'long.jsonl'})",
        }


def _two_sources(path: Path, second: str) -> Path:
    """The recipe at `path` with its held-out file as a second training source, held out from each instead."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["data"]["train"] = [raw["data"]["train"], second]
    raw["data"].pop("eval")
    raw["data"]["eval_split"] = 0.25
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("write", "model", "second"),
    [
        (write_lm_recipe, "tiny:llama", "data/eval.txt"),
        (write_classify_recipe, "tiny:llama", "data/eval.jsonl"),
        (write_preference_recipe, "tiny:llama", "data/eval.jsonl"),
        (write_grpo_recipe, "tiny:llama", "data/eval.jsonl"),
        (write_s2s_recipe, "tiny:t5", "data/eval.jsonl"),
    ],
    ids=["lm", "classify", "dpo", "grpo", "seq2seq"],
)
def test_every_objective_prepares_a_mixture_source_by_source(tmp_path, write, model, second):
    recipe = load_recipe(_two_sources(write(tmp_path), second))
    data = prepare_data(recipe, load_tokenizer(model))
    for split, dataset in (("train", data.train), ("eval", data.eval)):
        assert_sources_add_up(data.report[split], ["data.train[0]", "data.train[1]"])
        assert data.report[split]["rows"] == len(dataset)
    assert all(c["rows"] > 0 for c in data.report["eval"]["sources"].values())


# --- preview -------------------------------------------------------------------------------------------------


def test_preview_shows_rows_of_each_source_by_name(tmp_path, tok):
    path = mixture(tmp_path, [{"path": "data/a.jsonl", "weight": 1}, {"path": "data/b.jsonl", "weight": 1}])
    preview = build_preview(load_recipe(path), tok, n=2)
    a, b = (f"data.train[{i}] ({tmp_path / 'data' / name})" for i, name in enumerate(("a.jsonl", "b.jsonl")))
    assert preview.row_sources == [a, a, b, b]
    for source, tokens in zip(preview.row_sources, preview.rows, strict=True):
        assert f"{Path(source.rstrip(')')).stem} question" in "".join(t.text for t in tokens)
    assert_sources_add_up(preview.counts, ["data.train[0]", "data.train[1]"])
    output = CliRunner().invoke(app, ["data", "preview", str(path), "--n", "1"]).output
    assert f"--- {a}: row 1:" in output and f"--- {b}: row 1:" in output
    rows = preview.counts["sources"]["data.train[1]"]["rows"]
    assert f"  data.train[1] ({tmp_path / 'data' / 'b.jsonl'}): {rows} rows" in output


# --- the shipped mixture -------------------------------------------------------------------------------------


def test_the_shipped_mixture_copies_with_its_sources(tmp_path):
    dest = tmp_path / "mine" / "mix.yaml"
    dest.parent.mkdir()
    result = CliRunner().invoke(app, ["recipes", "copy", "mixture", str(dest)])
    assert result.exit_code == 0, result.output
    assert "data.train[0].path" in result.output and "data.eval[0]" in result.output
    copied = load_recipe(dest)
    shipped = load_recipe(RECIPES / "mixture.yaml")
    for key in ("train", "eval"):
        assert [s.path for _, _, s in copied.data.sources(key)] == [s.path for _, _, s in shipped.data.sources(key)]
    train, held_out = load_splits(shipped)
    assert [len(p.samples) for p in held_out.parts] == [64, 40]
    assert len(train.parts[0].samples) == 480 and math.isclose(len(train.samples) / 640, 1, rel_tol=0.05)
