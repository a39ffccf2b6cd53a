"""Sharding engines named in a recipe: FSDP under a multi-process launch, DeepSpeed configs checked against it."""

from __future__ import annotations

import importlib.util
import json

import pytest
from helpers import expect_error

from llmtune.recipe import load_recipe
from llmtune.run import finetune


def test_fsdp_without_a_multi_process_launch_is_refused_before_loading(make_recipe, monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    with expect_error("training.fsdp", "--nproc"):
        finetune(make_recipe(training={"max_steps": 1, "fsdp": True}))
    assert not (tmp_path / "runs" / "tiny").exists()


def test_deepspeed_config_path_is_resolved_and_checked(make_recipe, tmp_path):
    with expect_error("ds.json", "training.deepspeed file not found"):
        load_recipe(make_recipe(training={"deepspeed": "ds.json"}))
    (tmp_path / "ds.json").write_text("{}")
    assert load_recipe(make_recipe(training={"deepspeed": "ds.json"})).training.deepspeed == str(tmp_path / "ds.json")


def test_deepspeed_without_the_package_says_how_to_install(make_recipe, monkeypatch, tmp_path):
    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    (tmp_path / "ds.json").write_text("{}")
    monkeypatch.setenv("RANK", "0")
    with expect_error("pip install deepspeed"):
        finetune(make_recipe(training={"max_steps": 1, "deepspeed": "ds.json"}))


def _with_deepspeed(make_recipe, tmp_path, config, **training):
    (tmp_path / "ds.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    return load_recipe(make_recipe(training={"deepspeed": "ds.json", "batch_size": 4, "grad_accum": 2, **training}))


ZERO3_OFFLOAD = {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}


@pytest.mark.parametrize(
    "config",
    [
        {"zero_optimization": {"stage": 2}},
        {"zero_optimization": ZERO3_OFFLOAD},
        {
            "zero_optimization": {"stage": 3},
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 2,
            "train_batch_size": 16,  # 4 x 2 x 2 processes
            "gradient_clipping": 1.0,
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": False},
        },
    ],
)
def test_deepspeed_configs_consistent_with_the_recipe_load(make_recipe, tmp_path, config):
    assert _with_deepspeed(make_recipe, tmp_path, config).training.deepspeed == str(tmp_path / "ds.json")


@pytest.mark.parametrize(
    ("config", "training", "words"),
    [
        ("{stage: 2}", {}, ["not valid JSON", "line 1"]),
        ([2], {}, ["must hold a JSON object"]),
        ({"zero_optimization": {"stage": 4}}, {}, ["zero_optimization.stage is 4", "0, 1, 2 or 3"]),
        (
            {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
            {},
            ["offload_param needs stage 3", "set stage to 3 or use offload_optimizer"],
        ),
        ({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}, {}, ["needs stage 1, 2 or 3"]),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}, {}, ["device is 'gpu'", "nvme"]),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, {}, ["no nvme_path"]),
        (
            {"train_micro_batch_size_per_gpu": 8},
            {},
            ["train_micro_batch_size_per_gpu is 8 but training.batch_size is 4", '"auto"'],
        ),
        ({"gradient_accumulation_steps": 1}, {}, ["gradient_accumulation_steps is 1 but training.grad_accum is 2"]),
        ({"gradient_clipping": 0.5}, {}, ["gradient_clipping is 0.5 but training.max_grad_norm is 1.0"]),
        ({"train_batch_size": 12}, {}, ["train_batch_size is 12", "(8)"]),
        ({"fp16": {"enabled": True}}, {}, ["fp16.enabled is true", "training.bf16"]),
        ({"bf16": {"enabled": True}}, {"bf16": False}, ["bf16.enabled is true but training.bf16 is false"]),
    ],
)
def test_deepspeed_configs_at_odds_with_the_recipe_are_refused_naming_the_key(
    make_recipe, tmp_path, config, training, words
):
    with expect_error("ds.json", *words):
        _with_deepspeed(make_recipe, tmp_path, config, **training)


def test_the_suggested_auto_value_loads(make_recipe, tmp_path):
    config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto"}
    assert _with_deepspeed(make_recipe, tmp_path, config).training.batch_size == 4
