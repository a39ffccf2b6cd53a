"""Sharding engines named in a recipe: FSDP under a multi-process launch, DeepSpeed settings passed through."""

from __future__ import annotations

import importlib.util

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
