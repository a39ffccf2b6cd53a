"""finetune plans a run's memory before any weight loads: it prints the plan's summary, refuses a run that
cannot fit its device with a change that makes it fit, and that change (or training.check_memory=false) trains."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import expect_error, write_tiny_recipe

from llmtune import plan
from llmtune.run import finetune

# A CPU with a terabyte free: every tiny run fits; tests shrink it to make runs not fit.
ROOMY = plan.DeviceInfo("cpu (test)", 1 << 40, 1e11, 1e11, 1e10, gpu=False, native_bf16=False)


@pytest.fixture
def planned(monkeypatch) -> list[plan.MemoryPlan]:
    """The plans finetune makes at start, on the ROOMY CPU unless the test changes plan._CPU."""
    monkeypatch.setattr(plan, "_CPU", [ROOMY])
    seen: list[plan.MemoryPlan] = []
    real = plan.start_plan

    def spy(recipe, longest):
        seen.append(real(recipe, longest))
        return seen[-1]

    monkeypatch.setattr(plan, "start_plan", spy)
    return seen


def test_a_run_that_cannot_fit_is_refused_with_a_change_that_fits(tmp_path, monkeypatch, planned, capsys):
    recipe = write_tiny_recipe(tmp_path, training={"max_steps": 1, "batch_size": 4, "seed": 0})
    finetune(recipe)
    roomy = planned[-1]
    assert roomy is not None and roomy.fits and not roomy.speed.gradient_checkpointing
    assert roomy.summary() in capsys.readouterr().out
    # The plan is made for the data's longest row, not data.max_length, when every row is shorter.
    assert roomy.recipe.data.max_length < 96
    checkpointed = plan.plan_recipe(
        plan._with(roomy.recipe, {"speed": {"gradient_checkpointing": True}}), ROOMY, both_checkpointing=False
    )
    assert checkpointed.total < roomy.total

    # Memory between the two: the run as written does not fit, checkpointed it does.
    monkeypatch.setattr(plan, "_CPU", [replace(ROOMY, memory=(roomy.total + checkpointed.total) // 2)])
    run = tmp_path / "runs" / "refused"
    with expect_error(
        str(recipe),
        "the memory plan needs",
        "it fits with: llmtune finetune",
        "--set speed.gradient_checkpointing=true",
    ) as refusal:
        finetune(recipe, [f"output.dir={run}"])
    assert "training.check_memory=false" in str(refusal.value)
    assert not run.exists()  # refused before the run directory or the weights

    # The change the refusal names trains.
    finetune(recipe, [f"output.dir={tmp_path / 'runs' / 'fixed'}", "speed.gradient_checkpointing=true"])
    assert planned[-1].fits and (tmp_path / "runs" / "fixed" / "adapter" / "adapter_model.safetensors").is_file()
    # So does the way out it offers, without a plan.
    made = len(planned)
    finetune(recipe, [f"output.dir={tmp_path / 'runs' / 'anyway'}", "training.check_memory=false"])
    assert len(planned) == made and (tmp_path / "runs" / "anyway" / "adapter" / "adapter_model.safetensors").is_file()


def test_no_single_change_fits_says_what_is_left(tmp_path, monkeypatch, planned):
    monkeypatch.setattr(plan, "_CPU", [replace(ROOMY, memory=1 << 10)])
    recipe = write_tiny_recipe(tmp_path, training={"max_steps": 1})
    with expect_error("the memory plan needs", "shorten data.max_length", "training.check_memory=false") as refusal:
        finetune(recipe)
    assert "it fits with" not in str(refusal.value)
    assert not (tmp_path / "runs" / "tiny").exists()


def test_a_run_the_planner_cannot_model_says_so_and_trains(tmp_path, planned, capsys):
    recipe = write_tiny_recipe(
        tmp_path, method={"name": "prompt", "num_virtual_tokens": 4}, training={"max_steps": 1, "batch_size": 4}
    )
    finetune(recipe)
    assert planned == [None]
    assert "plan: none for this run (method prompt: its virtual tokens" in capsys.readouterr().out
    assert (tmp_path / "runs" / "tiny" / "adapter" / "adapter_model.safetensors").is_file()
