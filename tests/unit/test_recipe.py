"""The recipe schema and its loader: defaults, typo hints, types, `--set` overrides, paths, shipped recipes."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
from helpers import REPO, chat_rows, expect_error, save_recipe, write_jsonl

import llmtune.methods
import llmtune.objectives
from llmtune.data import split_samples
from llmtune.recipe import MethodSpec, ObjectiveSpec, load_recipe

DROP = object()  # a write_recipe value that removes the key
SHIPPED_RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write_recipe(directory: Path, **changes: Any) -> Path:
    """A minimal recipe (tiny:llama, LoRA, a chat file next to it); keyword sections replace, add or DROP keys."""
    write_jsonl(directory / "data" / "train.jsonl", chat_rows(4))
    recipe: dict[str, Any] = {"model": "tiny:llama", "method": {"name": "lora"}, "data": {"train": "data/train.jsonl"}}
    recipe = {key: value for key, value in {**recipe, **changes}.items() if value is not DROP}
    return save_recipe(directory, "r", recipe)


def literal_names(spec: Any) -> set[str]:
    """The `name` literals of every model in a discriminated union such as MethodSpec."""
    union = typing.get_args(spec)[0]  # Annotated[Union[...], Field(...)]; a one-member Union is the model itself
    models = typing.get_args(union) or (union,)
    return {name for model in models for name in typing.get_args(model.model_fields["name"].annotation)}


# --- a valid recipe ------------------------------------------------------------------------------


def test_minimal_recipe_loads_with_defaults(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    assert recipe.model == "tiny:llama"
    assert recipe.tokenizer is None
    assert (recipe.method.name, recipe.method.r, recipe.method.alpha, recipe.method.dropout) == ("lora", 8, 16.0, 0.05)
    assert recipe.method.target_modules == "all-linear"
    assert recipe.method.modules_to_save == []
    assert (recipe.objective.name, recipe.objective.loss_on) == ("sft", "response")
    assert recipe.data.eval is None
    assert (recipe.data.eval_split, recipe.data.format, recipe.data.max_length) == (0.1, "chat", 512)
    assert (recipe.data.overflow, recipe.data.chat_template, recipe.data.columns) == ("truncate", True, {})
    t = recipe.training
    assert (t.max_steps, t.epochs, t.batch_size, t.grad_accum, t.learning_rate, t.seed) == (None, None, 8, 1, 2e-4, 0)
    assert recipe.eval.metrics == ["perplexity", "bleu", "rouge", "exact_match"]
    assert recipe.eval.max_new_tokens == 64
    assert recipe.output.dir is None


def test_full_method_and_text_format(tmp_path):
    path = write_recipe(tmp_path, method={"name": "full"}, data={"train": "data/train.jsonl", "format": "text"})
    recipe = load_recipe(path)
    assert recipe.method.name == "full"
    # Plain text has no response part, so the loss covers every token.
    assert recipe.objective.loss_on == "all"


# --- unknown keys, wrong types, missing keys -----------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"modle": "tiny:llama"}, ("modle: unknown key", "did you mean 'model'")),
        ({"method": {"name": "lora", "rnak": 4}}, ("method.rnak: unknown key", "did you mean 'r'")),
        ({"training": {"lerning_rate": 1e-3}}, ("training.lerning_rate: unknown key", "did you mean 'learning_rate'")),
        ({"objective": {"name": "sft", "los_on": "all"}}, ("objective.los_on", "did you mean 'loss_on'")),
        ({"eval": {"max_new_token": 3}}, ("eval.max_new_token", "did you mean 'max_new_tokens'")),
        # Names from peft / transformers map to ours.
        ({"method": {"name": "lora", "lora_alpha": 4}}, ("method.lora_alpha", "did you mean 'alpha'")),
        ({"training": {"lr": 1e-3}}, ("training.lr", "did you mean 'learning_rate'")),
    ],
)
def test_unknown_key_names_path_and_suggests(tmp_path, changes, fragments):
    path = write_recipe(tmp_path, **changes)
    with expect_error(str(path), *fragments):
        load_recipe(path)


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write_recipe(tmp_path, output={"zzzz": 1})
    with expect_error("output.zzzz: unknown key", "valid keys: dir"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("changes", "key_path", "shown"),
    [
        ({"training": {"batch_size": "abc"}}, "training.batch_size", "'abc'"),
        ({"method": {"name": "lora", "r": "abc"}}, "method.r", "'abc'"),
        ({"training": {"max_steps": 0}}, "training.max_steps", "0"),
        ({"data": {"train": "data/train.jsonl", "format": "xml"}}, "data.format", "'xml'"),
        ({"eval": {"metrics": ["blue"]}}, "eval.metrics[0]", "'blue'"),
    ],
)
def test_wrong_type_names_key_path_and_value(tmp_path, changes, key_path, shown):
    path = write_recipe(tmp_path, **changes)
    with expect_error(str(path), f"{key_path}: ", f"(got {shown})"):
        load_recipe(path)


def test_unknown_method_name_lists_valid_names(tmp_path):
    path = write_recipe(tmp_path, method={"name": "lorra"})
    with expect_error("method.name: unknown name 'lorra'", *(repr(n) for n in llmtune.methods.METHODS)):
        load_recipe(path)


def test_unknown_objective_name_lists_valid_names(tmp_path):
    path = write_recipe(tmp_path, objective={"name": "reinforce"})
    with expect_error("objective.name: unknown name 'reinforce'", *(repr(n) for n in llmtune.objectives.OBJECTIVES)):
        load_recipe(path)


def test_method_without_name(tmp_path):
    path = write_recipe(tmp_path, method={"r": 4})
    with expect_error("method: needs a 'name' key"):
        load_recipe(path)


@pytest.mark.parametrize(
    ("changes", "key_path"), [({"model": DROP}, "model"), ({"method": DROP}, "method"), ({"data": {}}, "data.train")]
)
def test_missing_required_key(tmp_path, changes, key_path):
    path = write_recipe(tmp_path, **changes)
    with expect_error(str(path), f"{key_path}: required key is missing"):
        load_recipe(path)


def test_several_errors_stay_on_one_line(tmp_path):
    path = write_recipe(tmp_path, training={"batch_size": "abc", "lerning_rate": 1}, output={"dri": "x"})
    with expect_error("training.batch_size", "did you mean 'learning_rate'", "did you mean 'dir'"):
        load_recipe(path)


# --- YAML problems -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model: [tiny\nmethod: {name: lora}\n", "not valid YAML (line"),
        ("model: x\n\tmethod: 1\n", "not valid YAML (line 2)"),
        ("- model\n- method\n", "must be a YAML mapping"),
        ("just a string\n", "must be a YAML mapping"),
        ("", "must be a YAML mapping"),
    ],
)
def test_invalid_or_non_mapping_yaml(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with expect_error(str(path), fragment):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with expect_error(str(tmp_path / "nope.yaml"), "not found"):
        load_recipe(tmp_path / "nope.yaml")


# --- --set overrides -----------------------------------------------------------------------------


def test_set_overrides_are_typed_by_the_schema(tmp_path):
    recipe = load_recipe(
        write_recipe(tmp_path),
        ["training.max_steps=5", "output.dir=/tmp/x", "training.learning_rate=1e-3", "method.target_modules=[q_proj]"],
    )
    assert recipe.training.max_steps == 5 and type(recipe.training.max_steps) is int
    assert recipe.output.dir == "/tmp/x"
    assert recipe.training.learning_rate == pytest.approx(1e-3)
    assert recipe.method.target_modules == ["q_proj"]


def test_set_creates_missing_sections(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["eval.max_examples=3", "data.columns.messages=conversations"])
    assert recipe.eval.max_examples == 3
    assert recipe.data.columns == {"messages": "conversations"}


def test_set_value_may_contain_equals_sign(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["data.system_prompt=Answer with a=b"])
    assert recipe.data.system_prompt == "Answer with a=b"


def test_set_overrides_win_over_file_and_are_validated(tmp_path):
    path = write_recipe(tmp_path, training={"max_steps": 60})
    assert load_recipe(path, ["training.max_steps=7"]).training.max_steps == 7
    with expect_error("training.max_steps: ", "(got 'many')"):
        load_recipe(path, ["training.max_steps=many"])
    with expect_error("training.max_stesp: unknown key", "did you mean 'max_steps'"):
        load_recipe(path, ["training.max_stesp=5"])


@pytest.mark.parametrize("key", ["training.bf16", "speed.padding_free"])
def test_auto_or_bool_options_name_every_choice(tmp_path, key):
    path = write_recipe(tmp_path)
    section, name = key.split(".")
    for value, expected in (("auto", "auto"), ("true", True), ("off", False)):
        assert getattr(getattr(load_recipe(path, [f"{key}={value}"]), section), name) == expected
    with expect_error(f"{key}: expected auto, true or false (got 'maybe')"):
        load_recipe(path, [f"{key}=maybe"])


def test_set_string_field_with_numeric_value(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path), ["output.dir=2024"])
    assert recipe.output.dir == "2024"


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("training.max_steps", "expected KEY=VALUE"),
        ("=5", "expected KEY=VALUE"),
        ("model.name=x", "model in"),
    ],
)
def test_bad_set(tmp_path, item, fragment):
    with expect_error(f"--set {item!r}", fragment):
        load_recipe(write_recipe(tmp_path), [item])


# --- paths ---------------------------------------------------------------------------------------


def test_data_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    recipe_dir = tmp_path / "recipes"
    write_jsonl(tmp_path / "shared" / "eval.jsonl", chat_rows(2))
    path = write_recipe(recipe_dir, data={"train": "data/train.jsonl", "eval": "../shared/eval.jsonl"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(path)
    assert recipe.data.train == str((recipe_dir / "data" / "train.jsonl").resolve())
    assert recipe.data.eval == str((tmp_path / "shared" / "eval.jsonl").resolve())


def test_hub_dataset_name_is_left_as_is(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, data={"train": "someone/some-dataset"}))
    assert recipe.data.train == "someone/some-dataset"


@pytest.mark.parametrize("field", ["train", "eval"])
def test_missing_local_data_file_names_the_path(tmp_path, field):
    data = {"train": "data/train.jsonl", field: "data/missing.jsonl"}
    path = write_recipe(tmp_path, data=data)
    with expect_error(str(tmp_path / "data" / "missing.jsonl"), f"data.{field} file not found"):
        load_recipe(path)


# --- shipped recipes and registries --------------------------------------------------------------


def test_recipes_directory_has_recipes():
    assert SHIPPED_RECIPES, "no YAML files under recipes/"


# Recipes that continue an earlier stage name its run directory, which a fresh checkout lacks: a rule reward
# stands in for it here.
EARLIER_STAGES = {"ppo.yaml": ["objective.reward_model=null", "objective.reward=[similarity]"]}


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_loads_and_its_data_formats(path):
    stages = EARLIER_STAGES.get(path.name, [])
    recipe = load_recipe(path, stages)
    train, held_out = split_samples(recipe)
    assert train and held_out
    if recipe.objective.name == "sft":
        # Generation metrics need a prompt and a reference in every held-out row.
        assert all(s.prompt_and_reference() is not None for s in held_out)
    # The overrides every recipe must accept.
    recipe = load_recipe(path, [*stages, "training.max_steps=5", "output.dir=/tmp/x"])
    assert (recipe.training.max_steps, recipe.output.dir) == (5, "/tmp/x")


def test_method_registry_matches_schema():
    assert set(llmtune.methods.METHODS) == literal_names(MethodSpec)


def test_objective_registry_matches_schema():
    assert set(llmtune.objectives.OBJECTIVES) == literal_names(ObjectiveSpec)
