"""The recipe loader never answers with a traceback: a valid skeleton, known bad documents, and fuzzed ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    assert_one_line,
    chat_rows,
    write_jsonl,
)

from llmtune.errors import LLMTuneError
from llmtune.recipe import Recipe, load_recipe

# The tiny models train much faster on one thread on a busy two-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

try:
    import hypothesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # listed in the test extras; without it only the property tests are skipped
    hypothesis = None


# --- 10. the recipe loader never answers with a traceback --------------------------------------------------

VALID_RECIPE: dict[str, Any] = {
    "model": "tiny:llama",
    "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "objective": {"name": "sft"},
    "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
    "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "save_steps": 2},
    "eval": {"max_new_tokens": 6, "batch_size": 4, "metrics": ["bleu"]},
    "output": {"dir": "runs/x"},
}


def load_outcome(path: Path) -> Recipe | LLMTuneError:
    """What load_recipe answers: a Recipe or a one-line LLMTuneError; anything else fails the test."""
    try:
        return load_recipe(path)
    except LLMTuneError as e:
        assert_one_line(str(e))
        assert str(e).strip(), "an empty message"
        return e


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_jsonl(root / "data" / "train.jsonl", chat_rows(4))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(2))
    return root


def test_valid_skeleton_loads(fuzz_dir: Path):
    path = fuzz_dir / "valid.yaml"
    path.write_text(yaml.safe_dump(VALID_RECIPE))
    assert isinstance(load_outcome(path), Recipe)


if hypothesis is not None:
    # The pathological inputs are covered case by case in test_recipe_loader_known_bad_documents; here:
    # no \n or \r in keys and paths, integers well under 4300 digits, nesting a few levels deep.
    _text = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=20)
    _keys = st.one_of(
        _text,
        st.sampled_from(
            sorted({k for v in VALID_RECIPE.values() if isinstance(v, dict) for k in v} | set(VALID_RECIPE))
            + ["name", "r", "bits", "num_virtual_tokens", "pattern", "last_k", "init", "init_text", "columns"]
        ),
        st.integers(-5, 5),
        st.booleans(),
        st.none(),
    )
    _scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(allow_nan=True, allow_infinity=True),
        _text,
        st.sampled_from(["lora", "qlora", "prompt", "layers", "full", "sft", "chat", "text", "all-linear", "nf4"]),
    )
    # Values of the right shape for many keys, so that mutated skeletons are often still valid recipes.
    _plausible = st.one_of(
        st.integers(1, 64),
        st.floats(0.001, 0.9),
        st.booleans(),
        st.none(),
        st.sampled_from(["all-linear", "response", "all", "truncate", "drop", "cosine", "float32", "chat", "text"]),
    )
    _values = st.recursive(
        _scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
        max_leaves=12,
    )

    def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
        found = [prefix] if prefix else []
        if isinstance(tree, dict):
            for key, value in tree.items():
                found += _paths(value, (*prefix, key))
        return found

    def _same_kind(value: Any) -> st.SearchStrategy:
        """A random value of the same type as `value`: keeps the recipe's shape, probes its ranges."""
        if isinstance(value, bool):
            return st.booleans()
        if isinstance(value, int):
            return st.one_of(st.integers(-3, 100), st.integers(min_value=-(10**400), max_value=10**400))
        if isinstance(value, float):
            return st.floats(allow_nan=True, allow_infinity=True)
        if isinstance(value, str):
            return st.one_of(_text, st.sampled_from(["lora", "prompt", "chat", "text", "all-linear", "sft", "x.jsonl"]))
        if isinstance(value, list):
            return st.lists(st.sampled_from(["bleu", "rouge", "perplexity", "exact_match", "accuracy"]), max_size=4)
        return _values

    @st.composite
    def _retyped_skeletons(draw) -> Any:
        recipe = json.loads(json.dumps(VALID_RECIPE))
        for path in draw(st.lists(st.sampled_from(_paths(recipe)), max_size=3, unique=True)):
            node = recipe
            for key in path[:-1]:
                node = node[key]
            if path[-1] in node and not isinstance(node[path[-1]], dict):
                node[path[-1]] = draw(_same_kind(node[path[-1]]))
        return recipe

    @st.composite
    def _mutated_skeletons(draw) -> Any:
        recipe = json.loads(json.dumps(VALID_RECIPE))
        for _ in range(draw(st.integers(1, 4))):
            path = draw(st.sampled_from(_paths(recipe)))
            node = recipe
            for key in path[:-1]:
                node = node[key]
            if not isinstance(node, dict) or path[-1] not in node:
                continue
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                node[path[-1]] = draw(st.one_of(_plausible, _values))
            elif action == "delete":
                del node[path[-1]]
            else:
                node[draw(_keys)] = draw(_values)
        return recipe

    _documents = st.one_of(
        _values.map(lambda v: ("yaml", v)),
        _mutated_skeletons().map(lambda v: ("yaml", v)),
        _retyped_skeletons().map(lambda v: ("yaml", v)),
        _retyped_skeletons().map(lambda v: ("yaml", v)),
        _text.map(lambda t: ("text", t)),
        st.binary(max_size=200).map(lambda b: ("bytes", b)),
        st.just(("bytes", b"")),
        st.just(("bytes", b"\xff\xfe\x00m\x00o")),
        st.sampled_from(["---\n", "~\n", "[]\n", "''\n", "- model: x\n", "model: [\n", "\t", "a: b: c"]).map(
            lambda t: ("text", t)
        ),
    )

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(document=_documents, unicode=st.booleans())
    def _loader_property(fuzz_dir: Path, document: tuple[str, Any], unicode: bool) -> None:
        kind, value = document
        path = fuzz_dir / "fuzzed.yaml"
        if kind == "yaml":
            path.write_text(yaml.safe_dump(value, allow_unicode=unicode), encoding="utf-8")
        elif kind == "text":
            path.write_text(value, encoding="utf-8")
        else:
            path.write_bytes(value)
        outcome = load_outcome(path)
        hypothesis.event(f"{kind}: {'recipe' if isinstance(outcome, Recipe) else 'one-line error'}")

    def test_recipe_loader_answers_a_recipe_or_a_one_line_error(fuzz_dir: Path):
        _loader_property(fuzz_dir)

else:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[test]')")
    def test_recipe_loader_answers_a_recipe_or_a_one_line_error():
        pass


LOADER_BUGS = {
    "deep-flow-list": "[" * 3000 + "]" * 3000,
    "deep-block-mapping": "".join("  " * i + "a:\n" for i in range(1500)) + "  " * 1500 + "b: 1\n",
    "integer-over-4300-digits": "model: tiny:llama\nmethod: {name: lora, r: 1" + "0" * 5000 + "}\ndata: {train: x/y}\n",
    "newline-in-unknown-key": 'model: tiny:llama\nmethod: {name: lora}\ndata: {train: x/y}\ntraining: {"a\\nb": 1}\n',
    "newline-in-data-path": 'model: tiny:llama\nmethod: {name: lora}\ndata: {train: "a\\nb.jsonl"}\n',
    "data-path-too-long": "model: tiny:llama\nmethod: {name: lora}\ndata: {train: " + "a" * 300 + ".jsonl}\n",
    "model-name-too-long": "model: " + "m" * 300 + "\nmethod: {name: lora}\ndata: {train: x/y}\n",
    "deeply-nested-layers-pattern": "model: tiny:llama\nmethod: {name: layers, pattern: '"
    + "(" * 1200
    + ")" * 1200
    + "'}\ndata: {train: x/y}\n",
}


@pytest.mark.parametrize("text", list(LOADER_BUGS.values()), ids=list(LOADER_BUGS))
def test_recipe_loader_known_bad_documents(fuzz_dir: Path, text: str):
    path = fuzz_dir / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    load_outcome(path)
