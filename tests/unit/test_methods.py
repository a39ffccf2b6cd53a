"""The tuning-method catalogue: every method's exact trainable set, its bad-input errors, and finetune ->
save/reload -> eval (--compare-base) -> merge-adapter -> generate on the tiny in-process models.

Builder checks call `METHODS[name](spec, model, tokenizer)` directly on a fresh tiny model (milliseconds).
End-to-end checks share one in-process `finetune` per case through a module-scoped, lazily filled cache;
the model object handed to `llmtune.run._save_weights` is intercepted to record its end-of-training
logits and trainable set, which the saved run must reproduce.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import chat_rows, expect_error, logits_of, probe_batch, write_jsonl
from pydantic import TypeAdapter

import llmtune.run
from llmtune import artifacts
from llmtune.evaluation import complete, evaluate
from llmtune.merge import merge_adapter
from llmtune.methods import ADAPTER_METHODS, METHODS, UNMERGEABLE_METHODS
from llmtune.models import load_model, load_tokenizer, load_tuned, parameter_counts
from llmtune.recipe import MethodSpec, load_recipe
from llmtune.run import finetune

LLAMA, GPT2 = "tiny:llama", "tiny:gpt2"
PROBE_PROMPTS = ["Count: ab ab ab", "hi", "Hello there, how many words is this?"]
_METHOD_SPEC = TypeAdapter(MethodSpec)


# --- helpers ---------------------------------------------------------------------------------------


def spec_of(method: dict[str, Any]):
    """A method section validated by the recipe schema, as `load_recipe` would give it to a builder."""
    return _METHOD_SPEC.validate_python(method)


def fresh(ref: str, method: dict[str, Any]):
    """(model, tokenizer): a fresh tiny model through the method's builder, as finetune loads and builds it."""
    spec = spec_of(method)
    tokenizer = load_tokenizer(ref)
    quantization = spec if spec.name == "qlora" else None
    model = METHODS[spec.name](spec, load_model(ref, "float32", quantization), tokenizer)
    return model, tokenizer


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def lora_layers(model) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]


# --- 1. exact trainable set after each builder ----------------------------------------------------


def _check_scaling(expected: float):
    def check(model, tokenizer):
        layers = lora_layers(model)
        assert layers
        for layer in layers:
            assert layer.scaling["default"] == pytest.approx(expected)

    return check


def _check_b_nonzero(model, tokenizer):
    assert all(layer.lora_B["default"].weight.abs().max() > 0 for layer in lora_layers(model))


def _check_b_zero(model, tokenizer):
    assert all(layer.lora_B["default"].weight.abs().max() == 0 for layer in lora_layers(model))


def _check_dora(model, tokenizer):
    names = trainable_names(model)
    assert any("lora_magnitude_vector" in n for n in names), names
    # Every adapted layer has its magnitude vector.
    assert sum("lora_magnitude_vector" in n for n in names) == len(lora_layers(model))


def _check_quantized(class_name: str):
    def check(model, tokenizer):
        import bitsandbytes as bnb

        cls = getattr(bnb.nn, class_name)
        layers = lora_layers(model)
        assert len(layers) == 14  # 7 linear layers x 2 blocks of the tiny llama
        for layer in layers:
            assert isinstance(layer.get_base_layer(), cls), type(layer.get_base_layer())
        # No base linear layer of the blocks was left in full precision.
        plain = [
            n for n, m in model.named_modules() if type(m) is torch.nn.Linear and ".layers." in n and "lora_" not in n
        ]
        assert not plain, plain

    return check


def _check_text_init(text: str, n_tokens: int):
    def check(model, tokenizer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        repeated = (ids * n_tokens)[:n_tokens]
        expected = model.get_input_embeddings()(torch.tensor(repeated))
        got = model.prompt_encoder["default"].embedding.weight
        assert torch.equal(got, expected)

    return check


def _check_untied(model, tokenizer):
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is not embeddings.weight
    assert torch.equal(head.weight, embeddings.weight)  # a copy, same starting values
    assert model.config.tie_word_embeddings is False


def _check_shared(model, tokenizer):
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def _check_everything(model, tokenizer):
    counts = parameter_counts(model)
    assert counts["trainable"] == counts["total"]


def _check_head_copy(model, tokenizer):
    names = trainable_names(model)
    assert "base_model.model.lm_head.modules_to_save.default.weight" in names, names
    assert "base_model.model.lm_head.original_module.weight" not in names


def _check_adapters(n_adapters: int, reduction_factor: int):
    def check(model, tokenizer):
        hidden = model.config.hidden_size
        adapters = [m for n, m in model.named_modules() if n.endswith(".bottleneck_adapter")]
        assert len(adapters) == n_adapters
        width = hidden // reduction_factor
        assert {(a.down.in_features, a.down.out_features, a.up.out_features) for a in adapters} == {
            (hidden, width, hidden)
        }
        # down (weight + bias) and up (weight + bias) per adapter: nothing else trains.
        per_adapter = hidden * width + width + width * hidden + hidden
        assert parameter_counts(model)["trainable"] == n_adapters * per_adapter

    return check


def _no_check(model, tokenizer):
    pass


def _checks(*checks: Callable) -> Callable:
    def check(model, tokenizer):
        for c in checks:
            c(model, tokenizer)

    return check


BLOCK1 = re.compile(r"^model\.layers\.1\.")
ANY_BLOCK = re.compile(r"^model\.layers\.[01]\.")

# id -> (model, method section, which parameter names must train (all others frozen), extra check)
BUILD_CASES: dict[str, tuple[str, dict[str, Any], Callable[[str], bool], Callable]] = {
    "lora": (LLAMA, {"name": "lora"}, lambda n: "lora_" in n, _check_scaling(16 / 8)),
    "lora-modules-to-save-lm_head": (
        LLAMA,
        {"name": "lora", "modules_to_save": ["lm_head"]},
        lambda n: "lora_" in n or n.endswith("lm_head.modules_to_save.default.weight"),
        _check_head_copy,
    ),
    "lora-plain-scaling-default-init": (
        LLAMA,
        {"name": "lora", "r": 4, "alpha": 8},
        lambda n: "lora_" in n,
        _checks(_check_scaling(8 / 4), _check_b_zero),
    ),
    "rslora-scaling": (
        LLAMA,
        {"name": "lora", "r": 4, "alpha": 8, "use_rslora": True},
        lambda n: "lora_" in n,
        _check_scaling(8 / math.sqrt(4)),
    ),
    "lora-init-gaussian": (LLAMA, {"name": "lora", "init": "gaussian"}, lambda n: "lora_" in n, _no_check),
    "lora-init-pissa": (LLAMA, {"name": "lora", "init": "pissa"}, lambda n: "lora_" in n, _check_b_nonzero),
    "lora-init-olora": (LLAMA, {"name": "lora", "init": "olora"}, lambda n: "lora_" in n, _no_check),
    "dora": (LLAMA, {"name": "dora"}, lambda n: "lora_" in n, _check_dora),
    "qlora-4bit": (LLAMA, {"name": "qlora"}, lambda n: "lora_" in n, _check_quantized("Linear4bit")),
    "qlora-8bit": (LLAMA, {"name": "qlora", "bits": 8}, lambda n: "lora_" in n, _check_quantized("Linear8bitLt")),
    "ia3": (LLAMA, {"name": "ia3"}, lambda n: "ia3_" in n, _no_check),
    "prefix": (LLAMA, {"name": "prefix"}, lambda n: "prompt_encoder" in n, _no_check),
    "prefix-projection": (LLAMA, {"name": "prefix", "projection": True}, lambda n: "prompt_encoder" in n, _no_check),
    "prompt": (LLAMA, {"name": "prompt"}, lambda n: "prompt_encoder" in n, _no_check),
    "prompt-text-init": (
        LLAMA,
        {"name": "prompt", "init": "text", "init_text": "Count:", "num_virtual_tokens": 8},
        lambda n: "prompt_encoder" in n,
        _check_text_init("Count:", 8),
    ),
    "p-tuning": (LLAMA, {"name": "p-tuning"}, lambda n: "prompt_encoder" in n, _no_check),
    "p-tuning-lstm": (LLAMA, {"name": "p-tuning", "encoder": "lstm"}, lambda n: "prompt_encoder" in n, _no_check),
    "adapter": (LLAMA, {"name": "adapter"}, lambda n: ".mlp.bottleneck_adapter." in n, _check_adapters(2, 16)),
    "adapter-houlsby-gpt2": (
        GPT2,
        {"name": "adapter", "placement": "houlsby", "reduction_factor": 8, "non_linearity": "gelu"},
        lambda n: re.search(r"^transformer\.h\.[01]\.(attn|mlp)\.bottleneck_adapter\.", n) is not None,
        _check_adapters(4, 8),
    ),
    "bitfit-gpt2": (GPT2, {"name": "bitfit"}, lambda n: n.endswith(".bias"), _no_check),
    "head-llama": (LLAMA, {"name": "head"}, lambda n: n == "lm_head.weight", _no_check),
    "head-gpt2-untie": (GPT2, {"name": "head"}, lambda n: n == "lm_head.weight", _check_untied),
    "head-gpt2-shared": (
        GPT2,
        {"name": "head", "tied": "shared"},
        lambda n: n == "transformer.wte.weight",
        _check_shared,
    ),
    "layers-default-last-block": (LLAMA, {"name": "layers"}, lambda n: bool(BLOCK1.search(n)), _no_check),
    "layers-last_k-2": (LLAMA, {"name": "layers", "last_k": 2}, lambda n: bool(ANY_BLOCK.search(n)), _no_check),
    "layers-pattern-mlp": (LLAMA, {"name": "layers", "pattern": "mlp"}, lambda n: "mlp" in n, _no_check),
    "full": (LLAMA, {"name": "full"}, lambda n: True, _check_everything),
}


@pytest.mark.parametrize("case", list(BUILD_CASES))
def test_builder_trains_exactly_the_expected_parameters(case: str):
    ref, method, should_train, extra = BUILD_CASES[case]
    model, tokenizer = fresh(ref, method)
    names = [name for name, _ in model.named_parameters()]
    expected = {name for name in names if should_train(name)}
    assert expected, f"{case}: the expectation selects no parameter of {names}"
    assert trainable_names(model) == expected
    # The count the run reports is exactly the trainable parameters' elements.
    counts = parameter_counts(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < counts["trainable"] <= counts["total"]
    if method["name"] != "full":
        assert counts["trainable"] < counts["total"]
    extra(model, tokenizer)


def test_lora_trainable_count_is_rank_times_in_plus_out_of_every_linear_but_the_head():
    r = 4
    base = load_model(LLAMA)
    expected = sum(
        r * (m.in_features + m.out_features)
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    )
    model, _ = fresh(LLAMA, {"name": "lora", "r": r})
    assert parameter_counts(model)["trainable"] == expected


def test_bitfit_trains_every_bias_of_gpt2():
    biases = {n for n, _ in load_model(GPT2).named_parameters() if n.endswith(".bias")}
    model, _ = fresh(GPT2, {"name": "bitfit"})
    assert trainable_names(model) == biases and len(biases) == 13


def _sgd_step(model, tokenizer) -> None:
    batch = probe_batch(tokenizer, PROBE_PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("case", [c for c in BUILD_CASES if not c.startswith("qlora")])
def test_one_optimizer_step_moves_only_trainable_parameters(case: str):
    ref, method, _, _ = BUILD_CASES[case]
    model, tokenizer = fresh(ref, method)
    trainable = trainable_names(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _sgd_step(model, tokenizer)
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved, f"{case}: nothing moved"
    assert moved <= trainable, f"{case}: frozen parameters moved: {sorted(moved - trainable)}"


@pytest.mark.parametrize(("tied", "embeddings_move"), [("untie", False), ("shared", True)])
def test_head_on_tied_gpt2_after_a_step(tied: str, embeddings_move: bool):
    model, tokenizer = fresh(GPT2, {"name": "head", "tied": tied})
    embeddings = model.get_input_embeddings().weight.detach().clone()
    head = model.get_output_embeddings().weight.detach().clone()
    _sgd_step(model, tokenizer)
    assert not torch.equal(model.get_output_embeddings().weight, head)
    assert torch.equal(model.get_input_embeddings().weight, embeddings) is not embeddings_move


# --- 2. bad input: one clear line ------------------------------------------------------------------


def _training(**extra: Any) -> dict[str, Any]:
    return {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "logging_steps": 1, **extra}


RECIPE_ERRORS = [
    pytest.param({"name": "lora", "r": 0}, {}, ["method.r", "greater than 0"], id="lora-r-0"),
    pytest.param({"name": "dora", "r": -2}, {}, ["method.r", "greater than 0"], id="dora-r-negative"),
    pytest.param({"name": "qlora", "r": 0}, {}, ["method.r", "greater than 0"], id="qlora-r-0"),
    pytest.param({"name": "prompt", "init": "text"}, {}, ["init_text"], id="prompt-text-without-init_text"),
    pytest.param({"name": "ia3", "r": 4}, {}, ["method.r", "lora", "ia3"], id="ia3-given-r"),
    pytest.param({"name": "bitfit", "last_k": 2}, {}, ["last_k", "layers"], id="bitfit-given-last_k"),
    pytest.param({"name": "lora", "num_virtual_tokens": 4}, {}, ["num_virtual_tokens", "prompt"], id="lora-given-nvt"),
    pytest.param({"name": "prefix", "init_text": "x"}, {}, ["init_text", "init: text"], id="prefix-init_text-not-text"),
    pytest.param(
        {"name": "prefix", "projection": True, "init": "vocab"},
        {},
        ["init: vocab", "projection"],
        id="prefix-activation-init-with-projection",
    ),
    pytest.param(
        {"name": "prefix"},
        {"gradient_checkpointing": True},
        ["training.gradient_checkpointing", "prefix"],
        id="prefix-with-gradient-checkpointing",
    ),
    pytest.param(
        {"name": "lora"},
        {"gradient_checkpointing": True, "fsdp": True, "fsdp_config": {"fsdp_activation_checkpointing": True}},
        ["training.gradient_checkpointing", "fsdp_config.activation_checkpointing", "auto"],
        id="gradient-checkpointing-twice-under-fsdp",
    ),
    pytest.param({"name": "layers", "pattern": "("}, {}, ["pattern", "regex"], id="layers-bad-regex"),
    pytest.param(
        {"name": "adapter", "reduction_factor": 0}, {}, ["method.reduction_factor", "greater than 0"], id="adapter-rf-0"
    ),
    pytest.param(
        {"name": "adapter", "placement": "after"},
        {},
        ["method.placement", "pfeiffer", "houlsby"],
        id="adapter-placement",
    ),
    pytest.param(
        {"name": "adapter", "non_linearity": "swish"}, {}, ["method.non_linearity", "relu"], id="adapter-activation"
    ),
    pytest.param({"name": "adapter", "r": 4}, {}, ["method.r", "lora", "'adapter'"], id="adapter-given-r"),
    pytest.param(
        {"name": "lora", "reduction_factor": 4}, {}, ["method.reduction_factor", "adapter"], id="lora-given-rf"
    ),
    pytest.param({"name": "layers", "last_k": 0}, {}, ["method.last_k"], id="layers-last_k-0"),
    pytest.param({"name": "head", "tied": "both"}, {}, ["method.tied", "untie", "shared"], id="head-bad-tied"),
    pytest.param(
        {"name": "lora", "bits": 4},
        {},
        ["method.bits", "qlora"],
        id="lora-given-qlora-bits",
    ),
]


@pytest.mark.parametrize(("method", "training", "fragments"), RECIPE_ERRORS)
def test_bad_method_options_are_one_line_recipe_errors(make_recipe, method, training, fragments):
    path = make_recipe(method=method, training=_training(**training))
    with expect_error(str(path), *fragments):
        load_recipe(path)


def test_refused_combination_fails_before_any_model_loads_or_run_dir_is_written(make_recipe, monkeypatch):
    path = make_recipe(method={"name": "prefix"}, training=_training(gradient_checkpointing=True))
    loaded = []
    monkeypatch.setattr(llmtune.run, "load_base_model", lambda *a, **k: loaded.append(a))
    with expect_error("gradient_checkpointing"):
        finetune(path)
    assert not loaded
    assert not (path.parent / "runs" / "tiny").exists()


BUILDER_ERRORS = [
    pytest.param(
        LLAMA,
        {"name": "lora", "target_modules": ["not_a_module"]},
        ["not_a_module", "q_proj", "v_proj"],
        id="lora-missing-target",
    ),
    pytest.param(
        LLAMA,
        {"name": "dora", "target_modules": ["not_a_module"]},
        ["not_a_module", "q_proj", "down_proj"],
        id="dora-missing-target",
    ),
    pytest.param(
        LLAMA, {"name": "ia3", "target_modules": ["not_a_module"]}, ["not_a_module", "q_proj"], id="ia3-missing-target"
    ),
    pytest.param(
        LLAMA,
        {"name": "qlora", "target_modules": ["not_a_module"]},
        ["not_a_module", "q_proj"],
        id="qlora-missing-target",
    ),
    pytest.param(
        LLAMA,
        {"name": "prompt", "init": "text", "init_text": "far too long a text", "num_virtual_tokens": 4},
        ["init_text", "num_virtual_tokens", "4"],
        id="prompt-init_text-longer-than-virtual-tokens",
    ),
    pytest.param(
        LLAMA,
        {"name": "prefix", "init": "text", "init_text": "far too long a text", "num_virtual_tokens": 4},
        ["init_text", "num_virtual_tokens", "4"],
        id="prefix-init_text-longer-than-virtual-tokens",
    ),
    pytest.param(LLAMA, {"name": "bitfit"}, ["bitfit", "bias", "GPT-2"], id="bitfit-on-bias-free-llama"),
    pytest.param(
        LLAMA,
        {"name": "layers", "pattern": "no_such_param"},
        ["method.pattern", "no_such_param"],
        id="layers-pattern-matches-nothing",
    ),
    pytest.param(
        LLAMA, {"name": "layers", "last_k": 3}, ["method.last_k", "3", "2 blocks"], id="layers-last_k-too-big"
    ),
    pytest.param(
        LLAMA,
        {"name": "adapter", "reduction_factor": 128},
        ["method.reduction_factor", "128", "hidden size is 64"],
        id="adapter-reduction-wider-than-hidden",
    ),
]


def load_and_build(make_recipe, ref: str, method: dict[str, Any]):
    """What finetune does before training: validate the recipe, load the model, run the method's builder."""
    recipe = load_recipe(make_recipe(model=ref, method=method))
    tokenizer = load_tokenizer(ref)
    quantization = recipe.method if recipe.method.name == "qlora" else None
    return METHODS[recipe.method.name](recipe.method, load_model(ref, "float32", quantization), tokenizer)


@pytest.mark.parametrize(("ref", "method", "fragments"), BUILDER_ERRORS)
def test_builder_refuses_with_one_line_error(make_recipe, ref, method, fragments):
    with expect_error(*fragments):
        load_and_build(make_recipe, ref, method)


def test_ia3_feedforward_modules_outside_target_modules_is_a_one_line_error(make_recipe):
    method = {"name": "ia3", "target_modules": ["q_proj"], "feedforward_modules": ["down_proj"]}
    with expect_error("feedforward_modules", "target_modules"):
        load_and_build(make_recipe, LLAMA, method)


def test_modules_to_save_that_do_not_exist_are_refused(make_recipe):
    with expect_error("modules_to_save", "not_a_module", "lm_head"):
        load_and_build(make_recipe, LLAMA, {"name": "lora", "modules_to_save": ["not_a_module"]})


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "bitsandbytes" else real(name, *a, **k)
    )
    with expect_error("bitsandbytes", "pip install"):
        load_model(LLAMA, "float32", spec_of({"name": "qlora"}))


# --- 3. end to end per method ---------------------------------------------------------------------

# id -> (model, method section as a user writes it, extra training keys)
E2E_CASES: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "lora": (LLAMA, {"name": "lora"}, {}),
    "lora-save-head": (LLAMA, {"name": "lora", "modules_to_save": ["lm_head"]}, {}),
    "rslora": (LLAMA, {"name": "lora", "r": 4, "alpha": 8, "use_rslora": True}, {}),
    "dora": (LLAMA, {"name": "dora"}, {}),
    "qlora": (LLAMA, {"name": "qlora"}, {}),
    "qlora-8bit": (LLAMA, {"name": "qlora", "bits": 8}, {}),
    "ia3": (LLAMA, {"name": "ia3"}, {}),
    "prefix": (LLAMA, {"name": "prefix"}, {}),
    "prompt": (LLAMA, {"name": "prompt"}, {}),
    "prompt-text": (LLAMA, {"name": "prompt", "init": "text", "init_text": "Count:", "num_virtual_tokens": 8}, {}),
    "p-tuning": (LLAMA, {"name": "p-tuning"}, {}),
    "adapter": (LLAMA, {"name": "adapter"}, {}),
    "adapter-houlsby-gpt2": (GPT2, {"name": "adapter", "placement": "houlsby", "non_linearity": "gelu"}, {}),
    "bitfit": (GPT2, {"name": "bitfit"}, {}),
    "head": (GPT2, {"name": "head"}, {}),
    "head-shared": (GPT2, {"name": "head", "tied": "shared"}, {}),
    "layers": (LLAMA, {"name": "layers"}, {}),
    "full": (LLAMA, {"name": "full"}, {}),
    "lora-gc": (LLAMA, {"name": "lora"}, {"gradient_checkpointing": True}),
    "prompt-gc": (LLAMA, {"name": "prompt"}, {"gradient_checkpointing": True}),
}
GC_CASES = ["lora-gc", "prompt-gc"]
# Scoring and generation on two held-out rows exercise every path (prefix cache, virtual tokens) at a third of the cost.
EVAL_OVERRIDES = ["eval.max_examples=2"]
MAIN_CASES = [c for c in E2E_CASES if c not in GC_CASES]
MERGEABLE = [c for c in MAIN_CASES if E2E_CASES[c][1]["name"] in ADAPTER_METHODS - UNMERGEABLE_METHODS]
UNMERGEABLE = [c for c in MAIN_CASES if E2E_CASES[c][1]["name"] in UNMERGEABLE_METHODS]
STANDALONE = [c for c in MAIN_CASES if E2E_CASES[c][1]["name"] not in ADAPTER_METHODS]


def method_of(case: str) -> str:
    return E2E_CASES[case][1]["name"]


def write_recipe(root: Path, name: str, ref: str, method: dict[str, Any], **training: Any) -> Path:
    write_jsonl(root / "data" / "train.jsonl", chat_rows(24))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(6))
    recipe = {
        "model": ref,
        "method": method,
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
        # lr 1e-2 so three steps move every method's weights well away from their start. The end-of-training
        # model is compared with the saved run in float32; training.frozen_bf16 would leave its frozen weights
        # rounded to bf16 (tests/test_speed.py checks that lever's save and reload under autocast).
        "training": _training(frozen_bf16=False, **training),
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "output": {"dir": str(root / "runs" / name)},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@dataclass
class Trained:
    case: str
    recipe: Path
    run: Path
    metrics: dict[str, Any]
    probe: dict[str, torch.Tensor]
    logits: torch.Tensor  # end-of-training model, eval mode, on `probe`
    trainable: dict[str, int]  # name -> numel of what required grad when the run saved its weights
    trainable_dtypes: set[torch.dtype]
    state: dict[str, torch.Tensor]  # the end-of-training model's state dict (non-adapter methods only)
    trainable_state_keys: set[str]  # its keys that are (or alias) a trainable parameter: tied heads count


def _train(root: Path, case: str) -> Trained:
    ref, method, training = E2E_CASES[case]
    recipe = write_recipe(root, case, ref, method, **training)
    probe = probe_batch(load_tokenizer(ref), PROBE_PROMPTS)
    seen: dict[str, Any] = {}
    save_weights = llmtune.run._save_weights

    def spy(run, model, recipe_):
        seen["logits"] = logits_of(model, probe)
        seen["trainable"] = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
        seen["dtypes"] = {p.dtype for p in model.parameters() if p.requires_grad}
        seen["state"], seen["state_keys"] = {}, set()
        if method["name"] not in ADAPTER_METHODS:
            state = model.state_dict(keep_vars=True)
            pointers = {p.data_ptr() for p in model.parameters() if p.requires_grad}
            seen["state"] = {k: v.detach().clone() for k, v in state.items()}
            seen["state_keys"] = {k for k, v in state.items() if v.data_ptr() in pointers}
        return save_weights(run, model, recipe_)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llmtune.run, "_save_weights", spy)
        result = finetune(recipe)
    assert "logits" in seen, "finetune never called _save_weights"
    return Trained(
        case,
        recipe,
        result.run.path,
        result.metrics,
        probe,
        seen["logits"],
        seen["trainable"],
        seen["dtypes"],
        seen["state"],
        seen["state_keys"],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[str], Trained]:
    """case -> its finished run, trained once per module on first use."""
    root = tmp_path_factory.mktemp("methods")
    cache: dict[str, Trained] = {}

    def get(case: str) -> Trained:
        if case not in cache:
            cache[case] = _train(root, case)
        return cache[case]

    return get


@pytest.fixture(scope="module")
def base_eval(tmp_path_factory) -> Callable[[str], dict[str, float]]:
    """model ref -> eval metrics of the untouched base model, once per ref."""
    root = tmp_path_factory.mktemp("base-eval")
    cache: dict[str, dict[str, float]] = {}

    def get(ref: str) -> dict[str, float]:
        if ref not in cache:
            recipe = write_recipe(root, ref.replace(":", "-"), ref, {"name": "full"})
            cache[ref] = evaluate(recipe, overrides=EVAL_OVERRIDES).results["base"]
        return cache[ref]

    return get


@pytest.mark.parametrize("case", MAIN_CASES)
def test_run_directory_holds_adapter_or_model(trained, case: str):
    t = trained(case)
    manifest = json.loads((t.run / artifacts.MANIFEST_FILE).read_text())
    assert manifest["status"] == "completed"
    if method_of(case) in ADAPTER_METHODS:
        # peft writes adapter_config.json; llmtune's bottleneck adapters their own config.
        config = "bottleneck_config.json" if method_of(case) == "adapter" else "adapter_config.json"
        assert (t.run / "adapter" / config).is_file()
        assert not (t.run / "model").exists()
    else:
        assert (t.run / "model" / "config.json").is_file()
        assert not (t.run / "adapter").exists()
    assert math.isfinite(t.metrics["train_loss"]) and t.metrics["steps"] == 3


@pytest.mark.parametrize("case", MAIN_CASES)
def test_metrics_report_the_trainable_and_total_parameter_counts(trained, case: str):
    t = trained(case)
    on_disk = json.loads((t.run / artifacts.METRICS_FILE).read_text())["parameters"]
    ref, method, _ = E2E_CASES[case]
    model, _ = fresh(ref, method)
    assert on_disk == t.metrics["parameters"] == parameter_counts(model)
    # What trained is what the builder chose, and the reported count is exactly its elements.
    assert set(t.trainable) == trainable_names(model)
    assert on_disk["trainable"] == sum(t.trainable.values())
    assert (on_disk["trainable"] == on_disk["total"]) is (method["name"] == "full")


@pytest.mark.parametrize("case", MAIN_CASES + GC_CASES)
def test_reloaded_run_gives_the_end_of_training_logits(trained, case: str):
    t = trained(case)
    model, _ = load_tuned(t.run)
    reloaded = logits_of(model, t.probe)
    assert reloaded.shape == t.logits.shape
    assert (reloaded - t.logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("case", [c for c in MAIN_CASES if method_of(c) in ADAPTER_METHODS])
def test_adapter_weights_train_and_save_in_float32(trained, case: str):
    """Every recipe here asks for float32 (training.dtype, and qlora's compute_dtype default)."""
    from safetensors import safe_open

    t = trained(case)
    assert t.trainable_dtypes == {torch.float32}
    with safe_open(str(t.run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.parametrize("case", STANDALONE)
def test_standalone_methods_change_only_what_they_train(trained, case: str):
    t = trained(case)
    ref = E2E_CASES[case][0]
    base = load_model(ref).state_dict()
    tuned = t.state
    moved = {k for k in base if k in tuned and not torch.equal(base[k], tuned[k])}
    assert moved, "training changed nothing"
    assert moved <= t.trainable_state_keys, f"frozen weights changed: {sorted(moved - t.trainable_state_keys)}"


def test_head_untie_keeps_the_input_embeddings_through_training_and_reload(trained):
    t = trained("head")
    base = load_model(GPT2)
    model, _ = load_tuned(t.run)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, base.get_input_embeddings().weight)
    assert not torch.equal(model.get_output_embeddings().weight, base.get_output_embeddings().weight)


@pytest.mark.parametrize("case", MAIN_CASES)
def test_evaluate_compare_base_for_every_method(trained, base_eval, case: str):
    t = trained(case)
    report = evaluate(t.run, compare_base=True, overrides=EVAL_OVERRIDES)
    assert report.examples == 2 and len(report.predictions) == 2
    assert set(report.results) == {"tuned", "base"}
    tuned, base = report.results["tuned"], report.results["base"]
    assert math.isfinite(tuned["perplexity"]) and math.isfinite(base["perplexity"])
    assert tuned["perplexity"] != base["perplexity"], "the tuned model scores exactly as its base"
    if method_of(case) != "qlora":  # a qlora base is the 4-bit model, not the float one
        reference = base_eval(E2E_CASES[case][0])
        assert base["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-5)


@pytest.mark.parametrize("case", MERGEABLE)
def test_merge_adapter_folds_the_adapter_into_a_plain_model(trained, tmp_path: Path, case: str):
    from transformers import AutoModelForCausalLM

    t = trained(case)
    out = tmp_path / "merged"
    result = merge_adapter(t.run, out)
    assert result.max_abs_diff < 1e-3
    assert result.base_max_abs_diff > 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    linears = [m for n, m in merged.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert len(linears) == 4 and all(type(m) is torch.nn.Linear for m in linears)
    if method_of(case) != "qlora":
        # Without quantization the merged model computes the end-of-training function.
        assert (logits_of(merged, t.probe) - t.logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", UNMERGEABLE)
def test_merge_adapter_refuses_unmergeable_methods(trained, tmp_path: Path, case: str):
    t = trained(case)
    with expect_error("nothing to merge", "generate"):
        merge_adapter(t.run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", STANDALONE)
def test_merge_adapter_says_standalone_models_need_no_merge(trained, tmp_path: Path, case: str):
    t = trained(case)
    with expect_error("already a standalone model"):
        merge_adapter(t.run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", MAIN_CASES)
def test_complete_generates_text_for_every_method(trained, case: str):
    t = trained(case)
    text = complete(str(t.run), "hi", max_new_tokens=4)
    assert isinstance(text, str)


# --- 4. gradient checkpointing ---------------------------------------------------------------------


@pytest.mark.parametrize("case", GC_CASES)
def test_gradient_checkpointing_trains(trained, case: str):
    t = trained(case)
    assert math.isfinite(t.metrics["train_loss"]) and t.metrics["steps"] == 3
    assert math.isfinite(t.metrics["eval_loss"])
    recipe = load_recipe(t.run / artifacts.RECIPE_FILE)
    assert recipe.training.gradient_checkpointing is True
    # It trained what the method trains, and the weights moved.
    plain = trained(case.removesuffix("-gc"))
    assert set(t.trainable) == set(plain.trainable)
    assert (t.logits - logits_of(load_model(E2E_CASES[case][0]), t.probe)).abs().max().item() > 0


@pytest.mark.parametrize(
    "method",
    [
        {"name": "prefix", "num_virtual_tokens": 4},
        {"name": "prompt", "num_virtual_tokens": 4},
        {"name": "p-tuning", "num_virtual_tokens": 4},
        {"name": "lora", "r": 4},
    ],
    ids=lambda m: m["name"],
)
def test_generation_equals_greedy_decoding_by_full_forward_passes(method, one_torch_thread):
    from llmtune.evaluation import generate_texts, pad_batch

    spec = TypeAdapter(MethodSpec).validate_python(method)
    tokenizer = load_tokenizer("tiny:llama")
    torch.manual_seed(0)
    model = METHODS[spec.name](spec, load_model("tiny:llama"), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))  # virtual tokens that matter to every next-token choice
    model.eval()
    prompts = [tokenizer("3 July 1999 ->")["input_ids"], tokenizer("a longer prompt, 24 Nov 1968 ->")["input_ids"]]
    one_by_one = generate_texts(model, tokenizer, prompts, max_new_tokens=8, batch_size=1)
    # Batched, the shorter prompt is left-padded: the pads sit between the virtual tokens and the prompt.
    batched = generate_texts(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    expected = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(8):
            batch, attn = pad_batch([ids], tokenizer.pad_token_id, left=True)
            with torch.no_grad():
                next_id = int(model(input_ids=batch, attention_mask=attn).logits[0, -1].argmax())
            if next_id == tokenizer.eos_token_id:
                break
            ids.append(next_id)
        expected.append(tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True).strip())
    assert one_by_one == expected
    assert batched == expected


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_prefix_from_text_equals_the_base_model_reading_that_text_first(ref, one_torch_thread):
    """init: text stores the model's own keys and values for the text, in the layout peft reads them back."""
    tokenizer = load_tokenizer(ref)
    text = "Dates, please:"
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    spec = TypeAdapter(MethodSpec).validate_python(
        {"name": "prefix", "num_virtual_tokens": n, "init": "text", "init_text": text}
    )
    model = METHODS["prefix"](spec, load_model(ref), tokenizer).eval()
    ids = tokenizer("3 July 1999 -> 1999-07-03")["input_ids"]
    prefix = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        tuned = model(input_ids=torch.tensor([ids])).logits[0]
        with model.disable_adapter():
            reading_it = model(input_ids=torch.tensor([prefix + ids])).logits[0, n:]
            without = model(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(tuned, reading_it, atol=1e-5)
    assert (tuned - without).abs().max() > 1e-2  # the prefix is really there


def test_prefix_defaults_to_activations_of_vocabulary_tokens(one_torch_thread):
    """The default prefix is keys/values the model itself produced, on the scale of its own, not N(0, 1)."""
    tokenizer = load_tokenizer("tiny:llama")
    default, random_init = (
        METHODS["prefix"](TypeAdapter(MethodSpec).validate_python(m), load_model("tiny:llama"), tokenizer)
        for m in ({"name": "prefix"}, {"name": "prefix", "init": "random"})
    )
    ids = torch.tensor([tokenizer("3 July 1999 -> 1999-07-03")["input_ids"]])
    with torch.no_grad():
        cache = default.get_base_model()(input_ids=ids, use_cache=True).past_key_values
        own_scale = torch.cat([layer.keys.flatten() for layer in cache.layers]).std()
        weights = [m.prompt_encoder["default"].embedding.weight for m in (default, random_init)]
    assert 0.2 < weights[0].std() / own_scale < 5
    assert weights[1].std() > 0.9  # peft's N(0, 1)


@pytest.mark.parametrize(
    "method", [{"name": "prefix"}, {"name": "prompt"}, {"name": "p-tuning"}], ids=lambda m: m["name"]
)
def test_compare_base_of_virtual_tokens_is_the_untouched_base(method, one_torch_thread):
    from llmtune.evaluation import _base_of, generate_texts

    tokenizer = load_tokenizer("tiny:llama")
    torch.manual_seed(0)
    spec = TypeAdapter(MethodSpec).validate_python(method)
    model = METHODS[spec.name](spec, load_model("tiny:llama"), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    prompts = [tokenizer("3 July 1999 ->")["input_ids"], tokenizer("24 Nov 1968 ->")["input_ids"]]
    base = generate_texts(load_model("tiny:llama"), tokenizer, prompts, max_new_tokens=6, batch_size=2)
    with _base_of(model, None) as shown_as_base:
        assert generate_texts(shown_as_base, tokenizer, prompts, max_new_tokens=6, batch_size=2) == base
    assert generate_texts(model, tokenizer, prompts, max_new_tokens=6, batch_size=2) != base
