"""The speed layer's choices: one plan per recipe and device, the field's kernels on a GPU and the CPU's own levers
on the CPU, printed and saved with the run."""

from __future__ import annotations

import sys
import types

import pytest
from helpers import RECIPES

from llmtune import accel
from llmtune.accel import Device, resolve
from llmtune.errors import LLMTuneError
from llmtune.models import load_model
from llmtune.recipe import load_recipe

CPU = Device("cpu", "test CPU", native_bf16=True)
GPU = Device("cuda", "test GPU", native_bf16=True)


@pytest.fixture(scope="module")
def llama():
    return load_model("tiny:llama")


def test_auto_takes_the_cpu_levers_on_the_cpu_and_the_gpu_levers_on_a_gpu(llama, monkeypatch):
    monkeypatch.setattr(accel, "liger_families", lambda: frozenset({"llama"}))
    quickstart = load_recipe(RECIPES / "quickstart.yaml")
    cpu, gpu = resolve(quickstart, CPU, llama), resolve(quickstart, GPU, llama)
    assert (cpu.kernels, gpu.kernels) == ("llmtune", "liger")
    assert cpu.fused_lora and cpu.compact_dropout and cpu.float32_attention and not cpu.frozen_bf16
    assert not (gpu.fused_lora or gpu.compact_dropout or gpu.float32_attention) and gpu.frozen_bf16
    assert (cpu.gradient_checkpointing, gpu.gradient_checkpointing) == (False, True)
    assert cpu.bf16 and gpu.bf16 and cpu.fused_loss and gpu.fused_loss and cpu.recast_frozen and gpu.recast_frozen


def test_liger_only_for_the_families_it_supports(llama, monkeypatch):
    quickstart = load_recipe(RECIPES / "quickstart.yaml")
    monkeypatch.setattr(accel, "liger_families", lambda: frozenset({"qwen2", "mistral"}))
    # Without Liger for the family, a GPU run keeps llmtune's own fused blocks, which run anywhere.
    assert resolve(quickstart, GPU, llama).kernels == "llmtune"
    monkeypatch.setattr(accel, "liger_families", frozenset)  # the gpu extra not installed
    assert resolve(quickstart, GPU, llama).kernels == "llmtune"
    off = load_recipe(RECIPES / "quickstart.yaml", ["speed.fused_kernels=false"])
    monkeypatch.setattr(accel, "liger_families", lambda: frozenset({"llama"}))
    assert resolve(off, GPU, llama).kernels is None


def test_liger_families_is_empty_without_the_gpu_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails as when it is not installed
    assert accel.liger_families() == frozenset()


def test_applying_liger_patches_the_base_model_with_its_layer_kernels_only(llama, monkeypatch):
    calls = []
    fake = types.ModuleType("liger_kernel.transformers")
    fake._apply_liger_kernel_to_instance = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake)
    monkeypatch.setattr(accel, "liger_families", lambda: frozenset({"llama"}))
    from llmtune.methods import METHODS, PEFT_TASK_TYPES

    recipe = load_recipe(RECIPES / "quickstart.yaml", ["training.bf16=false"])
    model = METHODS["lora"](recipe.method, load_model("tiny:llama"), None, task_type=PEFT_TASK_TYPES["causal-lm"])
    plan = resolve(recipe, GPU, model)
    assert plan.kernels == "liger" and not plan.bf16
    assert accel.apply(model, plan) is not None  # the fused loss, for the trainer
    (kwargs,) = calls
    assert kwargs.pop("model") is model.get_base_model()
    # Liger's fused linear cross-entropy would replace the forward that speed.fused_loss relies on.
    assert kwargs["fused_linear_cross_entropy"] is False and kwargs["cross_entropy"] is False
    assert kwargs["rms_norm"] and kwargs["swiglu"] and kwargs["rope"]


def test_under_sharding_the_levers_that_replace_forwards_stay_off(llama):
    sharded = load_recipe(RECIPES / "quickstart.yaml", ["training.fsdp=true"])
    for device in (CPU, GPU):
        plan = resolve(sharded, device, llama)
        assert plan.sharded and plan.kernels is None
        assert not (plan.fused_loss or plan.fused_lora or plan.frozen_bf16 or plan.recast_frozen)


@pytest.mark.parametrize("lever", ["fused_loss", "fused_kernels", "fused_lora", "frozen_bf16", "recast_frozen"])
def test_a_lever_asked_for_under_sharding_is_refused_in_one_line(lever):
    with pytest.raises(LLMTuneError, match=f"speed.{lever}: fsdp and deepspeed own the weights") as info:
        load_recipe(RECIPES / "quickstart.yaml", ["training.fsdp=true", f"speed.{lever}=true"])
    assert "\n" not in str(info.value)


def test_bf16_levers_follow_mixed_precision(llama):
    plain = load_recipe(RECIPES / "quickstart.yaml", ["training.bf16=false", "speed.fused_lora=true"])
    plan = resolve(plain, CPU, llama)
    assert not (plan.bf16 or plan.fused_lora or plan.recast_frozen or plan.float32_attention)
    assert plan.compact_dropout  # dropout masks do not depend on autocast


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("training.fused_lora", "speed.fused_lora"),
        ("training.fused_blocks", "speed.fused_kernels"),
        ("training.cpu_float32_attention", "speed.float32_attention"),
        ("data.padding_free", "speed.padding_free"),
    ],
)
def test_a_lever_set_where_it_used_to_be_names_its_new_key(old, new):
    with pytest.raises(LLMTuneError, match=f"{old}: unknown key; speed levers have their own section: set {new}"):
        load_recipe(RECIPES / "quickstart.yaml", [f"{old}=true"])
    # The fix the message names works.
    assert getattr(load_recipe(RECIPES / "quickstart.yaml", [f"{new}=true"]).speed, new.split(".")[1]) is True


def test_the_full_precision_guard_is_no_longer_an_option():
    with pytest.raises(LLMTuneError, match="training.full_precision_outputs: unknown key; .* remove it"):
        load_recipe(RECIPES / "quickstart.yaml", ["training.full_precision_outputs=false"])
