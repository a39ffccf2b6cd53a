"""Speed and precision levers through finetune on tiny:llama: length grouping, every lever, frozen bf16, fused LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import chat_batch as _batch
from helpers import write_jsonl

from llmtune.run import finetune


def test_length_grouping_cuts_padding(make_recipe, sft_trainers, tmp_path):

    # Lengths from one to forty words, shuffled: random batches mix short and long rows. Enough rows for the
    # sampler to sort groups of several batches at once (it keeps at least four groups).
    words = [" ".join(["ab"] * (1 + (i * 17) % 40)) for i in range(320)]
    rows = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": "ok"}]} for w in words]
    write_jsonl(tmp_path / "long.jsonl", rows)
    waste = {}
    for grouped in (True, False):
        path = make_recipe(
            f"group-{grouped}",
            data={
                "train": str(tmp_path / "long.jsonl"),
                "eval_split": 0.0,
                "format": "chat",
                "max_length": 256,
            },
            training={"max_steps": 1, "batch_size": 8, "group_by_length": grouped, "bf16": False},
            speed={"padding_free": False},
        )
        finetune(path)
        padded = real_tokens = 0
        for batch in sft_trainers[-1].get_train_dataloader():
            padded += batch["attention_mask"].numel()
            real_tokens += int(batch["attention_mask"].sum())
        waste[grouped] = 1 - real_tokens / padded
    assert waste[True] < 0.1 < waste[False], waste


def test_finetune_with_every_lever_follows_the_plain_loss_curve(make_recipe):
    curves = {}
    for name, fast in (("fast", True), ("plain", False)):
        path = make_recipe(
            name,
            data={
                "train": "data/train.jsonl",
                "eval": "data/eval.jsonl",
                "format": "chat",
                "max_length": 96,
            },
            training={
                "max_steps": 4,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "logging_steps": 1,
                "bf16": fast,
                "group_by_length": False,
            },
            speed={"padding_free": fast, "fused_loss": fast, "fused_kernels": fast, "fused_lora": fast},
        )
        run = finetune(path).run
        log = [json.loads(line) for line in (run.path / "trainer_log.jsonl").read_text().splitlines()]
        curves[name] = [entry["loss"] for entry in log if "loss" in entry]
    assert len(curves["fast"]) == len(curves["plain"]) == 4
    # bf16 matmuls round to 8 bits of mantissa: the curves agree to well under a percent, not bit for bit.
    assert curves["fast"] == pytest.approx(curves["plain"], rel=1e-2)
    assert curves["fast"] != curves["plain"]


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_frozen_bf16_stores_the_frozen_weights_and_the_saved_adapter_reproduces_training(
    method, make_recipe, sft_trainers
):
    training = {"max_steps": 2, "learning_rate": 1e-2, "bf16": True}
    run = finetune(make_recipe(method={"name": method}, training=training, speed={"frozen_bf16": True})).run
    model = sft_trainers[0].model
    head = model.get_output_embeddings()
    blocks = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad and m is not head]
    assert blocks
    assert {m.weight.dtype for m in blocks} == {torch.bfloat16}
    if not torch.cuda.is_available():  # compared as training ran, on the CPU
        # The saved adapter over the float32 base from its checkpoint computes under autocast exactly what
        # training computed.
        from llmtune.accel.attention import use_segmented_attention
        from llmtune.accel.precision import fuse_lora_layers, route_frozen_linears
        from llmtune.models import load_tuned

        reloaded, tokenizer = load_tuned(run.path)
        route_frozen_linears(reloaded)
        fuse_lora_layers(reloaded)
        use_segmented_attention(reloaded, float32=True)  # as training attends on the CPU
        ids = _batch(tokenizer)["input_ids"]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model.eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits)


@pytest.mark.parametrize("fused_lora, routed", [("auto", True), (False, False)])
def test_fused_lora_auto_routes_every_lora_layer_of_a_cpu_run(fused_lora, routed, make_recipe, sft_trainers):
    from peft.tuners.lora import Linear as LoraLinear

    training = {"max_steps": 1, "bf16": True}
    finetune(make_recipe(method={"name": "lora", "dropout": 0.1}, training=training, speed={"fused_lora": fused_lora}))
    layers = [m for m in sft_trainers[0].model.modules() if type(m) is LoraLinear]
    assert layers and all(("forward" in vars(m)) is routed for m in layers)


def test_finetune_prints_the_plan_and_saves_it_in_the_run(make_recipe, capsys):
    run = finetune(make_recipe(training={"max_steps": 1, "bf16": False}, speed={"padding_free": False})).run
    saved = json.loads((run.path / "speed.json").read_text())
    assert saved["device"] == "cpu" and saved["bf16"] is False and saved["padding_free"] is False
    assert saved["kernels"] == "llmtune" and saved["fused_loss"] is True
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("speed on cpu: "))
    assert "fused loss" in line and "llmtune kernels" in line and "bf16" not in line


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_gpu_run_trains_with_the_gpu_plan(method, make_recipe):
    from llmtune.accel.liger import liger_families

    run = finetune(make_recipe(method={"name": method}, training={"max_steps": 2})).run
    plan = json.loads((run.path / "speed.json").read_text())
    assert plan["device"] == "cuda" and not plan["compact_dropout"] and not plan["fused_lora"]
    assert plan["kernels"] == ("liger" if "llama" in liger_families() else "llmtune")
    if method == "lora":  # a QLoRA base computes in its own compute dtype, without autocast
        assert plan["bf16"] is torch.cuda.is_bf16_supported() and plan["frozen_bf16"] is plan["bf16"]
    metrics = json.loads((run.path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
