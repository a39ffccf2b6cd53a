"""Bottleneck adapters (llmtune.bottleneck): the start equals the base, save/load round trips, and models without
blocks are refused. Checkpoints that carry the adapters through a resume: tests/integration/test_bottleneck_runs.py.

The method's catalogue checks (trainable set, eval --compare-base, generate, merge refusal, bad options) are
cases of tests/unit/test_methods.py and tests/integration/test_methods_runs.py; its compatibility-matrix cells are
in tests/integration/test_compat.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import expect_error
from helpers import probe_logits as logits
from safetensors.torch import load_file

from llmtune.bottleneck import CONFIG_FILE, WEIGHTS_FILE, add_adapters, load_adapters, save_adapters
from llmtune.methods import METHODS
from llmtune.models import load_model, load_tokenizer
from llmtune.recipe import AdapterSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def adapted(ref: str, **options) -> tuple[torch.nn.Module, AdapterSpec]:
    spec = AdapterSpec(name="adapter", **options)
    return METHODS["adapter"](spec, load_model(ref), load_tokenizer(ref)), spec


def perturb(model) -> None:
    """Give every adapter weight (the zero up-projections too) random values, as training would."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
@pytest.mark.parametrize("placement", ["pfeiffer", "houlsby"])
def test_adapted_model_starts_equal_to_its_base(ref: str, placement: str):
    base = logits(load_model(ref))
    model, _ = adapted(ref, placement=placement)
    assert torch.equal(logits(model), base)
    perturb(model)
    assert (logits(model) - base).abs().max() > 1e-3, "the adapters do not reach the output"


@pytest.mark.parametrize("ref", ["tiny:llama", "tiny:gpt2"])
def test_saved_adapters_reload_into_a_fresh_base_with_identical_logits(tmp_path: Path, ref: str):
    model, spec = adapted(ref, placement="houlsby", non_linearity="tanh")
    perturb(model)
    expected = logits(model)
    save_adapters(model, tmp_path, spec)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    # Only the adapters are written, not the base weights.
    assert all(".bottleneck_adapter." in key for key in load_file(tmp_path / WEIGHTS_FILE))
    reloaded = load_adapters(load_model(ref), spec, tmp_path)
    assert torch.equal(logits(reloaded), expected)


def test_adapters_saved_for_other_modules_are_refused(tmp_path: Path):
    model, spec = adapted("tiny:llama", placement="houlsby")
    save_adapters(model, tmp_path, spec)
    with expect_error(str(tmp_path), "model.layers.0.self_attn", "model.layers.0.mlp"):
        load_adapters(load_model("tiny:llama"), spec.model_copy(update={"placement": "pfeiffer"}), tmp_path)


def test_a_model_without_attention_and_feed_forward_blocks_is_refused_naming_what_it_has():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=2)
    named = ("self_attn", "mlp", "SelfAttention", "DenseReluDense")
    with expect_error("method adapter", "T5ForConditionalGeneration", *named):
        add_adapters(T5ForConditionalGeneration(config), AdapterSpec(name="adapter"))


def test_an_objective_with_a_task_head_is_refused():
    with expect_error("method adapter", "SEQ_CLS", "lora"):
        METHODS["adapter"](AdapterSpec(name="adapter"), load_model("tiny:llama"), None, task_type="SEQ_CLS")
