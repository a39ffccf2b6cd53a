"""Optimizers and schedules in the recipe: bare names and options, refused combinations, and the learning rates
the Trainer's schedule then gives each step."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import yaml
from helpers import expect_error, tiny_training
from transformers import SchedulerType, Trainer, TrainingArguments
from transformers.optimization import get_scheduler

from llmtune import optim
from llmtune.recipe import dump_recipe, load_recipe
from llmtune.recipe.optim import OPTIMIZER_SPECS, SCHEDULE_SPECS


def test_every_optimizer_and_schedule_has_a_trainer_name():
    assert set(optim.TRAINER_OPTIM) == set(OPTIMIZER_SPECS)
    assert set(SCHEDULE_SPECS) <= {s.value for s in SchedulerType}


def test_a_bare_name_is_the_name_with_default_options_and_survives_the_saved_recipe(make_recipe, tmp_path):
    path = make_recipe(training=tiny_training(optimizer="sgd", lr_scheduler="cosine_with_min_lr"))
    recipe = load_recipe(path)
    assert (recipe.training.optimizer.name, recipe.training.optimizer.momentum) == ("sgd", 0.9)
    assert recipe.training.lr_scheduler.min_lr_ratio == 0.1
    # A run saves the resolved recipe and reloads it for eval and resume: the mapping form must load back the same.
    saved = tmp_path / "saved.yaml"
    saved.write_text(dump_recipe(recipe))
    assert yaml.safe_load(saved.read_text())["training"]["optimizer"] == {
        "name": "sgd",
        "momentum": 0.9,
        "nesterov": False,
    }
    assert load_recipe(saved) == recipe


def test_defaults_are_the_trainers_fused_adamw_and_a_linear_schedule(make_recipe):
    t = load_recipe(make_recipe()).training
    fields = optim.trainer_fields(t)
    assert fields["optim"] == "adamw_torch_fused" and fields["lr_scheduler_type"] == "linear"
    assert (fields["adam_beta1"], fields["adam_beta2"], fields["adam_epsilon"]) == (0.9, 0.999, 1e-8)
    assert fields["neftune_noise_alpha"] is None and fields["warmup_steps"] == 0


@pytest.mark.parametrize(
    ("training", "method", "fragments"),
    [
        ({"optimizer": {"name": "adamw", "momentum": 0.9}}, None, ("training.optimizer.momentum", "option of sgd")),
        ({"optimizer": {"name": "sgd", "betas": [0.9, 0.99]}}, None, ("training.optimizer.betas", "not of")),
        ({"optimizer": "adam"}, None, ("training.optimizer.name: unknown name 'adam'", "'adamw'")),
        ({"optimizer": {"name": "adamw", "betas": [0.9, 1.0]}}, None, ("training.optimizer.betas[1]",)),
        ({"optimizer": {"name": "adafactor", "warmup_init": True}}, None, ("training.optimizer", "relative_step")),
        ({"optimizer": {"name": "sgd", "momentum": 0, "nesterov": True}}, None, ("training.optimizer", "momentum")),
        (
            {"lr_scheduler": {"name": "cosine", "min_lr_ratio": 0.1}},
            None,
            ("training.lr_scheduler.min_lr_ratio", "option of cosine_with_min_lr"),
        ),
        ({"warmup_ratio": 0.1, "warmup_steps": 2}, None, ("training.warmup_ratio", "training.warmup_steps")),
        ({"lr_scheduler": "constant", "warmup_steps": 2}, None, ("training.lr_scheduler", "constant_with_warmup")),
        ({}, {"name": "ia3", "loraplus_lr_ratio": 16}, ("method.loraplus_lr_ratio", "option of lora, qlora, dora")),
        ({}, {"name": "full", "loraplus_lr_ratio": 16}, ("method.loraplus_lr_ratio", "not of method 'full'")),
        (
            {"optimizer": {"name": "adafactor", "relative_step": True}},
            {"name": "lora", "loraplus_lr_ratio": 16},
            ("method.loraplus_lr_ratio", "relative_step"),
        ),
    ],
)
def test_a_bad_combination_is_refused_at_load_naming_the_key(make_recipe, training, method, fragments):
    sections: dict[str, Any] = {"training": tiny_training(**training)}
    if method is not None:
        sections["method"] = method
    with expect_error(*fragments):
        load_recipe(make_recipe(**sections))


def test_neftune_is_refused_where_its_noise_would_reach_generations_or_be_spread_over_a_batch(make_recipe):
    grpo = {"name": "grpo", "reward": "exact_match", "num_generations": 4}
    with expect_error("training.neftune_noise_alpha", "grpo"):
        load_recipe(
            make_recipe(
                objective=grpo,
                data={"train": "data/train.jsonl", "format": "prompt_completion"},
                training=tiny_training(neftune_noise_alpha=5.0),
            )
        )
    with expect_error("speed.padding_free", "NEFTune"):
        load_recipe(make_recipe(training=tiny_training(neftune_noise_alpha=5.0), speed={"padding_free": True}))


def learning_rates(recipe_path, steps: int) -> list[float]:
    """The learning rate of each of `steps` steps, from the schedule the Trainer builds for the recipe."""
    t = load_recipe(recipe_path).training
    args = TrainingArguments(output_dir="unused", learning_rate=t.learning_rate, **optim.trainer_fields(t))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
    schedule = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return rates


@pytest.mark.parametrize(
    ("schedule", "floor"),
    [({"name": "cosine_with_min_lr", "min_lr_ratio": 0.2}, 0.2), ({"name": "polynomial", "min_lr_ratio": 0.3}, 0.3)],
)
def test_min_lr_ratio_is_where_the_schedule_ends(make_recipe, schedule, floor):
    lr = 1e-2
    rates = learning_rates(make_recipe(training=tiny_training(learning_rate=lr, lr_scheduler=schedule)), 101)
    assert rates[0] == pytest.approx(lr)
    assert min(rates) >= lr * floor - 1e-12
    assert rates[-1] == pytest.approx(lr * floor, rel=0.03)  # one step short of the end


def test_polynomial_power_bends_the_curve(make_recipe):
    def middle(power: float) -> float:
        schedule = {"name": "polynomial", "power": power}
        return learning_rates(make_recipe(training=tiny_training(learning_rate=1.0, lr_scheduler=schedule)), 101)[50]

    assert middle(1.0) == pytest.approx(0.5, abs=0.01)
    assert middle(2.0) == pytest.approx(0.25, abs=0.01)


def test_inverse_sqrt_timescale(make_recipe):
    schedule = {"name": "inverse_sqrt", "timescale": 10}
    rates = learning_rates(make_recipe(training=tiny_training(learning_rate=1.0, lr_scheduler=schedule)), 31)
    assert rates[10] == pytest.approx(1 / math.sqrt(2)) and rates[30] == pytest.approx(0.5)


def test_warmup_ratio_is_a_share_of_the_steps_rounded_up(make_recipe):
    rates = learning_rates(make_recipe(training=tiny_training(learning_rate=1.0, warmup_ratio=0.25)), 10)
    # ceil(0.25 x 10) = 3 warmup steps: 0, 1/3, 2/3, then the peak.
    assert rates[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])


@pytest.mark.parametrize(
    ("optimizer", "expected_class", "options"),
    [
        ("adamw", "torch.optim.adamw.AdamW", {"fused": True, "betas": (0.9, 0.999)}),
        ({"name": "adamw_8bit", "betas": [0.9, 0.95]}, "bitsandbytes.optim.adamw.AdamW", {"optim_bits": 8}),
        ("paged_adamw_8bit", "bitsandbytes.optim.adamw.AdamW", {"optim_bits": 8, "is_paged": True}),
        ("lion_8bit", "bitsandbytes.optim.lion.Lion", {"optim_bits": 8, "betas": (0.9, 0.99)}),
        ({"name": "sgd", "nesterov": True}, "torch.optim.sgd.SGD", {"momentum": 0.9, "nesterov": True}),
        (
            {"name": "adafactor", "relative_step": True, "beta1": 0.9},
            "transformers.optimization.Adafactor",
            {"lr": None, "relative_step": True, "beta1": 0.9, "scale_parameter": False},
        ),
    ],
    ids=["adamw", "adamw_8bit", "paged_adamw_8bit", "lion_8bit", "sgd", "adafactor"],
)
def test_each_optimizer_is_built_with_its_options(make_recipe, optimizer, expected_class, options):
    recipe = load_recipe(make_recipe(training=tiny_training(optimizer=optimizer)))
    args = TrainingArguments(output_dir="unused", learning_rate=1e-2, **optim.trainer_fields(recipe.training))
    cls, kwargs = optim.optimizer_hook(recipe, args) or Trainer.get_optimizer_cls_and_kwargs(args)
    assert f"{cls.__module__}.{cls.__qualname__}" == expected_class
    assert {key: kwargs.get(key) for key in options} == options
