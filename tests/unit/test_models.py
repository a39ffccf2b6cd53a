"""Model references and model_options: local GGUF files converted once by content, custom code refused unless
trusted, revision and attention passed to transformers, and 4-bit layers bitsandbytes cannot evaluate here."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from helpers import expect_error, probe_logits, write_tiny_checkpoint, write_tiny_gguf

import llmtune.models
from llmtune import accel
from llmtune.accel import device as device_facts
from llmtune.errors import LLMTuneError
from llmtune.models import (
    checkpoint_kind,
    load_base_model,
    load_model,
    load_tokenizer,
    options_for,
    resolve_checkpoint,
)
from llmtune.recipe import ModelOptionsSpec, QLoraSpec, load_recipe
from llmtune.recipe.models import ATTENTION_IMPLEMENTATIONS

CPU = accel.Device("cpu", "test CPU", native_bf16=True)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLMTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """The GGUF files converted while the test runs."""
    converted = []

    def convert(gguf, target, ref, real=llmtune.models._convert_gguf):
        converted.append(gguf)
        return real(gguf, target, ref)

    monkeypatch.setattr(llmtune.models, "_convert_gguf", convert)
    return converted


# --- .gguf files --------------------------------------------------------------------------------------


def test_a_gguf_file_loads_as_its_source_model_and_tokenizer_converted_once(tmp_path, home, conversions):
    gguf = write_tiny_gguf(tmp_path / "tiny-F32.gguf")
    model = load_model(str(gguf))
    assert torch.equal(probe_logits(model), probe_logits(load_model("tiny:llama")))
    tokenizer, source = load_tokenizer(str(gguf)), load_tokenizer("tiny:llama")
    text = "Count: ab ab<|im_end|>"
    assert tokenizer(text).input_ids == source(text).input_ids
    assert tokenizer.chat_template == source.chat_template
    assert checkpoint_kind(str(gguf)) == "causal-lm"
    # Model, tokenizer and kind read one conversion, kept under the file's content hash.
    assert conversions == [gguf]
    [cached] = (home / "gguf").iterdir()
    assert resolve_checkpoint(str(gguf)) == str(cached) and (cached / "config.json").is_file()


def test_a_changed_gguf_file_is_converted_again_under_a_new_key(tmp_path, home, conversions):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = resolve_checkpoint(str(gguf))
    changed = load_model("tiny:llama")
    with torch.no_grad():
        changed.lm_head.weight.mul_(2)
    write_tiny_gguf(gguf, changed)
    second = resolve_checkpoint(str(gguf))
    assert first != second and len(conversions) == 2
    assert torch.equal(probe_logits(load_model(str(gguf))), probe_logits(changed))
    # A copy of a file shares its conversion.
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(gguf.read_bytes())
    assert resolve_checkpoint(str(copy)) == second and len(conversions) == 2


def test_a_conversion_that_fails_halfway_leaves_nothing_that_is_trusted_later(tmp_path, home, monkeypatch):
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(llmtune.models, "make_readable", crash)  # after the weights and tokenizer are written
    with pytest.raises(OSError, match="disk full"):
        resolve_checkpoint(str(gguf))
    assert list((home / "gguf").glob("*")) == []
    monkeypatch.undo()
    monkeypatch.setenv("LLMTUNE_HOME", str(home))
    assert torch.equal(probe_logits(load_model(str(gguf))), probe_logits(load_model("tiny:llama")))


def test_a_corrupt_or_unsupported_gguf_file_is_one_line_naming_it_and_what_transformers_reads(tmp_path, home):
    import gguf as gguf_package
    import numpy as np

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()[:3000])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 10)
    unknown = tmp_path / "unknown.gguf"
    writer = gguf_package.GGUFWriter(str(unknown), "rwkv9")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    for path, why in ((truncated, ""), (junk, "magic"), (unknown, "rwkv9")):
        with expect_error(f"cannot convert {path}", why, "transformers reads GGUF files", "llama", "qwen2"):
            load_model(str(path))
    assert list((home / "gguf").glob("*")) == []
    with expect_error("model", "missing.gguf", "GGUF file not found"):
        load_tokenizer(str(tmp_path / "missing.gguf"))


def test_a_recipe_names_its_gguf_file_relative_to_itself_and_it_must_exist(make_recipe, tmp_path):
    (tmp_path / "weights").mkdir()
    write_tiny_gguf(tmp_path / "weights" / "tiny-Q8_0.gguf")
    recipe = load_recipe(make_recipe(model="weights/tiny-Q8_0.gguf"))
    assert recipe.model == str(tmp_path / "weights" / "tiny-Q8_0.gguf")
    with expect_error(str(tmp_path / "weights" / "other.gguf"), "model GGUF file not found", "relative to the recipe"):
        load_recipe(make_recipe(model="weights/other.gguf"))
    with expect_error("objective.teacher GGUF file not found"):
        load_recipe(make_recipe(objective={"name": "distill", "teacher": "weights/other.gguf"}))


# --- model_options ----------------------------------------------------------------------------------


def _with_auto_map(directory: Path, model_type: str) -> Path:
    config = json.loads((directory / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_custom_code_is_refused_before_transformers_unless_trusted(tmp_path, monkeypatch):
    custom = _with_auto_map(write_tiny_checkpoint(tmp_path / "custom"), "llmtune-custom")
    for load in (load_model, load_tokenizer, checkpoint_kind):
        with expect_error("model_options.trust_remote_code: true", str(custom / "config.json"), "'llmtune-custom'"):
            load(str(custom))
    # Trusted, the directory goes to transformers with trust_remote_code=True.
    seen = {}
    with monkeypatch.context() as patched:
        patched.setattr("transformers.AutoConfig.from_pretrained", lambda path, **kw: seen.update(kw))
        checkpoint_kind(str(custom), ModelOptionsSpec(trust_remote_code=True))
    assert seen["trust_remote_code"] is True
    # An auto_map beside a model_type transformers has needs no code of its own: loaded as usual.
    native = _with_auto_map(write_tiny_checkpoint(tmp_path / "native"), "llama")
    assert torch.equal(probe_logits(load_model(str(native))), probe_logits(load_model("tiny:llama")))


def test_revision_and_trust_remote_code_reach_from_pretrained_for_model_and_tokenizer(monkeypatch):
    calls = []

    def from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return types.SimpleNamespace(pad_token="<pad>")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", from_pretrained)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", from_pretrained)
    options = ModelOptionsSpec(revision="3f2a1c9", attn_implementation="eager")
    load_tokenizer("someorg/somemodel", options)
    load_model("someorg/somemodel", options=options)
    [(_, tokenizer_kwargs), (_, model_kwargs)] = calls
    assert tokenizer_kwargs == {"trust_remote_code": False, "revision": "3f2a1c9", "local_files_only": True}
    assert model_kwargs["revision"] == "3f2a1c9" and model_kwargs["attn_implementation"] == "eager"
    assert model_kwargs["trust_remote_code"] is False


def test_a_hub_repository_with_custom_code_is_refused_in_one_line_naming_the_key(monkeypatch):
    def from_pretrained(name, **kwargs):
        assert kwargs["trust_remote_code"] is False
        # transformers' own refusal, several lines long, when trust_remote_code is False.
        raise ValueError(
            f"The repository {name} contains custom code which must be executed to correctly load the model.\n"
            "Please pass the argument `trust_remote_code=True` to allow custom code to be run."
        )

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", from_pretrained)
    with expect_error("model 'someorg/custom'", "ships custom code", "model_options.trust_remote_code: true"):
        checkpoint_kind("someorg/custom")


def test_revision_names_a_commit_of_model_only(make_recipe):
    recipe = load_recipe(make_recipe(), ["model=someorg/somemodel", "model_options.revision=v2"])
    assert options_for(recipe, "someorg/somemodel").revision == "v2"
    assert options_for(recipe, "someorg/tokenizer").revision is None
    with expect_error("model_options.revision", "'tiny:llama' is not read from the hub"):
        load_recipe(make_recipe(model_options={"revision": "v2"}))


def test_attn_implementation_reaches_the_model_and_the_speed_plan_respects_it(make_recipe, tmp_path):
    checkpoint = write_tiny_checkpoint(tmp_path / "ckpt")
    for model in ("tiny:llama", str(checkpoint)):
        recipe = load_recipe(make_recipe(model=model, model_options={"attn_implementation": "eager"}))
        eager = load_base_model(recipe)
        assert eager.config._attn_implementation == "eager"
        # float32 attention is a variant of sdpa: an eager model keeps its attention, and the plan says so.
        assert not accel.resolve(recipe, CPU, eager).float32_attention
    default = load_recipe(make_recipe())
    sdpa = load_base_model(default)
    assert sdpa.config._attn_implementation == "sdpa" and accel.resolve(default, CPU, sdpa).float32_attention
    with expect_error("speed.float32_attention", "model_options.attn_implementation eager"):
        load_recipe(make_recipe(model_options={"attn_implementation": "eager"}, speed={"float32_attention": True}))


def test_every_attention_choice_is_one_transformers_has_and_flash_attention_needs_cuda():
    from transformers import AttentionInterface

    assert set(ATTENTION_IMPLEMENTATIONS) - {"auto", "eager"} <= set(AttentionInterface._global_mapping)
    with expect_error("model_options.attn_implementation: flash_attention_2 runs on CUDA GPUs only", "test CPU"):
        device_facts.check_attention("flash_attention_2", CPU)
    device_facts.check_attention("flash_attention_2", accel.Device("cuda", "test GPU", native_bf16=True))
    device_facts.check_attention("sdpa", CPU)


# --- QLoRA on bitsandbytes' CPU kernel ---------------------------------------------------------------


@pytest.mark.parametrize("hidden", [48, 64, 96])
def test_4bit_layers_are_refused_exactly_where_bitsandbytes_cannot_evaluate_them(hidden, monkeypatch):
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit weights for inference on CPUs with AVX512-BF16 only")
    spec, config = QLoraSpec(name="qlora"), {"hidden_size": hidden, "intermediate_size": 2 * hidden}
    try:
        load_model("tiny:llama", quantization=spec, **config)
        refused = None
    except LLMTuneError as e:
        refused = e
    monkeypatch.setattr(device_facts, "_packs_4bit_weights", lambda device: False)
    model = load_model("tiny:llama", quantization=spec, **config)
    try:
        probe_logits(model)
        failed = None
    except (AssertionError, RuntimeError) as e:
        failed = e
    assert (refused is None) == (failed is None), (refused, failed)


def test_a_4bit_layer_bitsandbytes_cannot_evaluate_is_named_with_its_widths_and_what_to_do(monkeypatch):
    monkeypatch.setattr(device_facts, "_packs_4bit_weights", lambda device: True)
    # hidden 48: the query projection reads 48 inputs (not a multiple of 64), the output projection writes 48.
    with expect_error(
        "model 'tiny:llama'",
        "4-bit layer model.layers.0.self_attn.q_proj (48 inputs, 64 outputs)",
        "multiples of 32",
        "quantization block (64)",
        "method.bits: 8",
        "lora",
    ):
        load_model("tiny:llama", quantization=QLoraSpec(name="qlora"), hidden_size=48)
    # 8-bit layers have no such kernel.
    load_model("tiny:llama", quantization=QLoraSpec(name="qlora", bits=8), hidden_size=48)
