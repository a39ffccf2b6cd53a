"""The memory planner (llmtune plan): its byte counts against the libraries' own state, a step's activations across
depths, a Llama-3.1-8B-sized QLoRA question answered from a config file alone, and the fixes it proposes."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, expect_error, run_cli, write_tiny_recipe
from typer.testing import CliRunner

from llmtune import plan
from llmtune.cli.app import app
from llmtune.recipe import load_recipe
from llmtune.recipe.methods import QLoraSpec
from llmtune.recipe.optim import AdafactorSpec, AdamW8bitSpec, AdamWSpec, Lion8bitSpec, SGDSpec

GiB = 1 << 30
MiB = 1 << 20

# Llama-3.1-8B's config.json: the model whose QLoRA users ask about, planned without a weight on disk.
LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def _state_bytes(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> int:
    # bitsandbytes' quantization maps (qmap*) are one table shared by every weight; scalars (the step counter,
    # Adafactor's RMS) are a few bytes a tensor.
    return sum(
        v.numel() * v.element_size()
        for k, v in optimizer.state[p].items()
        if torch.is_tensor(v) and v.dim() > 0 and not k.startswith("qmap")
    )


@pytest.mark.parametrize("shape", [(10, 30), (100, 100), (64,)])
@pytest.mark.parametrize(
    "spec",
    [
        AdamWSpec(name="adamw"),
        AdamW8bitSpec(name="adamw_8bit"),
        Lion8bitSpec(name="lion_8bit"),
        AdafactorSpec(name="adafactor"),
        AdafactorSpec(name="adafactor", beta1=0.9),
        SGDSpec(name="sgd"),
        SGDSpec(name="sgd", momentum=0.0),
    ],
    ids=lambda s: s.model_dump_json(exclude_defaults=True),
)
def test_optimizer_state_bytes_match_the_optimizers_own_state(spec, shape):
    import bitsandbytes as bnb
    from transformers.optimization import Adafactor

    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    build = {
        "adamw": lambda: torch.optim.AdamW([p]),
        "adamw_8bit": lambda: bnb.optim.AdamW8bit([p]),
        "lion_8bit": lambda: bnb.optim.Lion8bit([p]),
        "adafactor": lambda: Adafactor([p], lr=1e-3, relative_step=False, scale_parameter=False, beta1=spec.beta1),
        "sgd": lambda: torch.optim.SGD([p], lr=1e-3, momentum=spec.momentum),
    }[spec.name]
    optimizer = build()
    optimizer.step()
    assert plan.optimizer_bytes(spec, p) == _state_bytes(optimizer, p)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 200), (576, 1536)])
def test_four_bit_weight_bytes_match_bitsandbytes(shape, double_quant):
    from bitsandbytes.functional import quantize_4bit

    weight = torch.randn(shape)
    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    stored = [packed, state.absmax] + ([state.state2.absmax, state.offset] if double_quant else [])
    measured = sum(t.numel() * t.element_size() for t in stored)
    spec = QLoraSpec(name="qlora", double_quant=double_quant)
    assert plan._quantized_bytes(spec, weight) == ("nf4", measured)


@pytest.mark.parametrize(
    "text, expected", [("24GiB", 24 * GiB), ("24 GB", 24 * GiB), ("80g", 80 * GiB), ("512MiB", 512 * MiB)]
)
def test_memory_amounts_parse(text, expected):
    assert plan.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["24", "lots", "24TB", "-1GiB"])
def test_memory_amounts_that_are_not_amounts_are_refused(text):
    with expect_error(f"--memory {text!r}", "24GiB"):
        plan.parse_memory(text)


def test_unknown_device_names_the_known_ones():
    with expect_error("--device 'b200'", "h100", "rtx4090", "cpu"):
        plan.device_info("b200")


def test_counts_equal_the_model_the_run_builds(tmp_path):
    """Parameters, trained parameters and bytes of weights of the meta-device model equal the real model's."""
    from llmtune.methods import METHODS
    from llmtune.models import load_base_model

    recipe = load_recipe(write_tiny_recipe(tmp_path, training={"bf16": False, "grad_accum": 2}))
    result = plan.plan_recipe(recipe, plan.DEVICES["a100-80gb"], both_checkpointing=False)
    model = METHODS["lora"](recipe.method, load_base_model(recipe))
    params = list(model.parameters())
    assert result.parameters == sum(p.numel() for p in params)
    assert result.trainable_parameters == sum(p.numel() for p in params if p.requires_grad)
    # float32 training without autocast: nothing is cast, so weights are exactly the parameters' bytes.
    assert sum(result.weights.values()) == sum(p.numel() * p.element_size() for p in params)
    # Across micro-batches every trained weight's gradient stays alive.
    assert result.gradients == result.trainable == 4 * result.trainable_parameters
    assert result.optimizer == 2 * result.trainable


def test_activations_grow_linearly_with_depth_so_two_depths_give_the_rest(tmp_path):
    """The whole model's step is extrapolated from steps at 2 and 4 layers; at 6 layers the line must land on
    the directly planned step."""
    recipe = load_recipe(write_tiny_recipe(tmp_path, model="tiny:llama"))
    recipe = plan._with(recipe, {"data": {"max_length": 64}})
    device = plan.DEVICES["h100"]

    def at(depth: int) -> plan._Counts:
        config = plan._base_config(recipe)
        original = config.num_hidden_layers
        config.num_hidden_layers = 6
        try:
            return plan._step(recipe, device, depth)
        finally:
            config.num_hidden_layers = original

    line = plan._extrapolate(at(2), at(4), 6)
    direct = at(6)
    for key in ("parameters", "trainable_parameters", "optimizer"):
        assert getattr(line, key) == pytest.approx(getattr(direct, key), rel=0.02), key
    for peak in ("step", "steady"):
        assert sum(getattr(line, peak).values()) == pytest.approx(sum(getattr(direct, peak).values()), rel=0.02)
    assert sum(direct.steady.values()) > sum(at(4).steady.values()) > sum(at(2).steady.values())


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory) -> Path:
    """A QLoRA recipe on a directory holding Llama-3.1-8B's config.json and nothing else."""
    root = tmp_path_factory.mktemp("llama8b")
    (root / "llama-3.1-8b").mkdir()
    (root / "llama-3.1-8b" / "config.json").write_text(json.dumps(LLAMA_8B))
    return write_tiny_recipe(
        root,
        "qlora-8b",
        model=str(root / "llama-3.1-8b"),
        tokenizer="tiny:llama",
        method={"name": "qlora", "r": 8, "alpha": 16, "target_modules": "all-linear", "compute_dtype": "bfloat16"},
        data={"train": "data/train.jsonl", "format": "chat", "max_length": 2048},
        training={"batch_size": 4, "dtype": "bfloat16", "max_steps": 10},
    )


def test_qlora_of_an_8b_config_at_batch_4_of_2048_tokens_fits_24_gib(llama_8b):
    result = CliRunner().invoke(app, ["plan", str(llama_8b), "--memory", "24GiB", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    h, i, kv, layers, vocab = 4096, 14336, 1024, 32, 128256
    linear = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    # LoRA r=8 on every linear layer of every block: r x (in + out) each; the head is not targeted.
    lora = layers * sum(8 * (a + b) for a, b in linear)
    assert out["trainable_parameters"] == lora
    assert out["parameters"] == layers * (sum(a * b for a, b in linear) + 2 * h) + 2 * vocab * h + h + lora
    # Each block's linear weights in NF4 with double-quantized scales; embeddings and head stay bfloat16.
    spec = QLoraSpec(name="qlora", compute_dtype="bfloat16")
    nf4 = sum(plan._quantized_bytes(spec, torch.empty(a, b, device="meta"))[1] for a, b in linear)
    assert out["weights"]["nf4"] == layers * nf4
    # peft prepares a 4-bit model for training by keeping the rest (embeddings, head, norms) in float32, and
    # LoRA's weights train in float32: AdamW keeps two float32 moments for each.
    assert out["weights"]["float32"] == 4 * (2 * vocab * h + (2 * layers + 1) * h + lora)
    assert out["optimizer"] == 2 * 4 * lora
    # Gradients are made during backward; at the step's peak at most all of them exist.
    assert out["gradients"] <= 4 * lora
    assert out["gradient_checkpointing"] is True
    assert out["fits"] is True and out["total"] < 24 * GiB - plan.CUDA_RESERVE
    # Without checkpointing, four rows of 2,048 tokens keep every layer's activations: far past 24 GiB.
    assert out["total_other_checkpointing"] > 40 * GiB


def test_a_plan_that_does_not_fit_proposes_a_change_that_makes_it_fit(llama_8b):
    runner = CliRunner()
    first = runner.invoke(
        app, ["plan", str(llama_8b), "--memory", "24GiB", "--set", "speed.gradient_checkpointing=false"]
    )
    assert first.exit_code == 0, first.output
    assert "does not fit" in first.output
    fix = next(line for line in first.output.splitlines() if line.startswith("fits with: "))
    command = shlex.split(fix.removeprefix("fits with: ").split("  (peak")[0])
    assert command[:3] == ["llmtune", "finetune", str(llama_8b)]
    # The proposed command, planned as it is printed, fits.
    again = runner.invoke(app, ["plan", *command[2:], "--memory", "24GiB", "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["fits"] is True


def test_the_table_breaks_the_peak_down_and_says_whether_it_fits(llama_8b):
    result = CliRunner().invoke(app, ["plan", str(llama_8b), "--device", "rtx4090"])
    assert result.exit_code == 0, result.output
    text = result.output
    for row in ("weights, nf4", "gradients", "optimizer state (adamw)", "activations kept for backward", "peak"):
        assert row in text
    assert "RTX 4090" in text and "fits" in text
    assert re.search(r"speed: [\d.]+k?-[\d.]+k? tokens/s", text)


def test_more_devices_share_sharded_state(llama_8b):
    """FSDP splits weights, gradients and optimizer state over the devices; activations are per device."""
    recipe = load_recipe(llama_8b, ["training.fsdp=true"])
    one = plan.plan_recipe(recipe, plan.DEVICES["h100"], 1, both_checkpointing=False)
    four = plan.plan_recipe(recipe, plan.DEVICES["h100"], 4, both_checkpointing=False)
    assert sum(four.weights.values()) == pytest.approx(sum(one.weights.values()) / 4, abs=8)
    assert four.optimizer == pytest.approx(one.optimizer / 4, abs=4)
    assert four.activations == one.activations
    assert four.tokens_per_step == 4 * one.tokens_per_step


def test_objectives_that_generate_while_training_are_not_planned(tmp_path):
    from helpers import write_grpo_recipe

    recipe = load_recipe(write_grpo_recipe(tmp_path))
    with expect_error("objective grpo", "plan the same model with objective sft"):
        plan.plan_recipe(recipe, plan.DEVICES["h100"])


@pytest.mark.parametrize("option", [["--device", "b200"], ["--memory", "lots"]])
def test_cli_errors_are_one_line(tmp_path, option):
    recipe = write_tiny_recipe(tmp_path)
    assert_one_line_error(run_cli("plan", str(recipe), *option, cwd=tmp_path), f"{option[0]} {option[1]!r}")


@pytest.mark.parametrize("method, copies", [({"name": "full"}, True), ({"name": "lora", "r": 4}, False)])
def test_dpo_without_an_adapter_holds_a_second_copy_of_the_base_as_its_reference(tmp_path, method, copies):
    from helpers import write_preference_recipe

    recipe = load_recipe(write_preference_recipe(tmp_path, method=method))
    result = plan.plan_recipe(recipe, plan.DEVICES["h100"], both_checkpointing=False)
    if copies:
        # Full fine-tuning in float32: the copy weighs what the trained model does.
        assert result.weights["reference copy"] == result.weights["float32"] == result.trainable
    else:
        assert "reference copy" not in result.weights


FULL_FLOAT32 = ["method={name: full}", "training.dtype=float32", "training.batch_size=1", "data.max_length=512"]


def test_when_no_recipe_change_fits_a_gpu_the_fix_shards_over_more_gpus(llama_8b):
    """Full float32 fine-tuning of an 8B model: weights, gradients and AdamW state alone are over 100 GiB."""
    one = plan.plan_recipe(load_recipe(llama_8b, FULL_FLOAT32), plan.DEVICES["a100-40gb"], both_checkpointing=False)
    assert not one.fits and one.optimizer == 2 * 4 * one.trainable_parameters
    flags, fixed = plan.propose_fix(one)
    nproc = int(flags.rsplit(" ", 1)[1])
    assert flags == f"--set training.fsdp=true --nproc {nproc}" and fixed.fits
    # Each device holds 1/nproc of the weights and optimizer state; half as many devices would not fit.
    assert fixed.optimizer == pytest.approx(one.optimizer / nproc, abs=nproc)
    sharded = load_recipe(llama_8b, [*FULL_FLOAT32, "training.fsdp=true"])
    assert not plan.plan_recipe(sharded, plan.DEVICES["a100-40gb"], nproc // 2, both_checkpointing=False).fits
