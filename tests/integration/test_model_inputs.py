"""Model inputs end to end: a run trained from a local GGUF file, and a QLoRA base bitsandbytes could train but not
evaluate on this CPU, refused before the first step."""

from __future__ import annotations

import json
import math

import torch
from helpers import expect_error, manifest, probe_logits, tiny_training, write_tiny_checkpoint, write_tiny_gguf

from llmtune import artifacts
from llmtune.accel import device as device_facts
from llmtune.models import load_model, load_tuned
from llmtune.run import finetune


def test_a_run_trains_from_a_gguf_file_and_reloads_from_its_run_directory(make_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTUNE_HOME", str(tmp_path / "home"))
    (tmp_path / "weights").mkdir()
    write_tiny_gguf(tmp_path / "weights" / "tiny-F32.gguf")
    recipe = make_recipe(model="weights/tiny-F32.gguf", training=tiny_training(max_steps=2))
    run = finetune(recipe).run.path
    assert manifest(run)["status"] == "completed"
    metrics = json.loads((run / artifacts.METRICS_FILE).read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["eval_loss"])
    # The run reloads from the converted checkpoint: its base is the GGUF file's model, its adapter trained.
    tuned, tokenizer = load_tuned(run)
    with tuned.disable_adapter():
        assert torch.equal(probe_logits(tuned), probe_logits(load_model("tiny:llama")))
    assert not torch.equal(probe_logits(tuned), probe_logits(load_model("tiny:llama")))
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert len(list((tmp_path / "home" / "gguf").iterdir())) == 1


def test_qlora_on_a_base_bitsandbytes_cannot_evaluate_here_fails_before_the_first_step(
    make_recipe, tmp_path, monkeypatch
):
    monkeypatch.setattr(device_facts, "_packs_4bit_weights", lambda device: True)
    checkpoint = write_tiny_checkpoint(tmp_path / "hidden48", hidden_size=48)
    recipe = make_recipe(model=str(checkpoint), method={"name": "qlora"})
    with expect_error("4-bit layer model.layers.0.self_attn.q_proj (48 inputs", "method.bits: 8"):
        finetune(recipe)
    assert not (tmp_path / "runs" / "tiny").exists()
