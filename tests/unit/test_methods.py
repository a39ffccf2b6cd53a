"""The tuning-method catalogue: every method's exact trainable set, its bad-input errors, and generation with
virtual tokens on the tiny in-process models.

Builder checks call `METHODS[name](spec, model, tokenizer)` directly on a fresh tiny model (milliseconds).
The end-to-end checks per method (finetune -> save/reload -> eval -> merge-adapter -> generate) are in
tests/integration/test_methods_runs.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import (
    GPT2,
    LLAMA,
    expect_error,
    fresh,
    probe_batch,
    spec_of,
    trainable_names,
)
from helpers import METHOD_PROBE_PROMPTS as PROBE_PROMPTS
from helpers import tiny_training as _training
from pydantic import TypeAdapter

import llmtune.run
from llmtune.methods import METHODS
from llmtune.models import load_model, load_tokenizer, parameter_counts
from llmtune.recipe import MethodSpec, load_recipe
from llmtune.run import finetune


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
        {"speed": {"gradient_checkpointing": True}},
        ["speed.gradient_checkpointing", "prefix"],
        id="prefix-with-gradient-checkpointing",
    ),
    pytest.param(
        {"name": "lora"},
        {
            "fsdp": True,
            "fsdp_config": {"fsdp_activation_checkpointing": True},
            "speed": {"gradient_checkpointing": True},
        },
        ["speed.gradient_checkpointing", "fsdp_config.activation_checkpointing", "auto"],
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
    speed = training.get("speed", {})
    training = {key: value for key, value in training.items() if key != "speed"}
    path = make_recipe(method=method, training=_training(**training), speed=speed)
    with expect_error(str(path), *fragments):
        load_recipe(path)


def test_refused_combination_fails_before_any_model_loads_or_run_dir_is_written(make_recipe, monkeypatch):
    path = make_recipe(method={"name": "prefix"}, training=_training(), speed={"gradient_checkpointing": True})
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
    from llmtune.batching import pad_batch
    from llmtune.generation import Sampling, generate_texts

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
    one_by_one = generate_texts(model, tokenizer, prompts, Sampling(max_new_tokens=8), batch_size=1)
    # Batched, the shorter prompt is left-padded: the pads sit between the virtual tokens and the prompt.
    batched = generate_texts(model, tokenizer, prompts, Sampling(max_new_tokens=8), batch_size=2)
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
    from llmtune.evaluation import _base_of
    from llmtune.generation import Sampling, generate_texts

    tokenizer = load_tokenizer("tiny:llama")
    torch.manual_seed(0)
    spec = TypeAdapter(MethodSpec).validate_python(method)
    model = METHODS[spec.name](spec, load_model("tiny:llama"), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    prompts = [tokenizer("3 July 1999 ->")["input_ids"], tokenizer("24 Nov 1968 ->")["input_ids"]]
    base = generate_texts(load_model("tiny:llama"), tokenizer, prompts, Sampling(max_new_tokens=6), batch_size=2)
    with _base_of(model, None, tokenizer) as shown_as_base:
        assert generate_texts(shown_as_base, tokenizer, prompts, Sampling(max_new_tokens=6), batch_size=2) == base
    assert generate_texts(model, tokenizer, prompts, Sampling(max_new_tokens=6), batch_size=2) != base
