"""Optimizers, schedules, LoRA+ and NEFTune in real runs on tiny:llama: what moves, what resumes, which learning
rate each weight gets and where the noise goes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import built_trainer, chat_batch, log_entries, losses, tiny_training
from safetensors.torch import load_file
from transformers import TrainerCallback

import llmtune.objectives
from llmtune.run import finetune

# The tiny models train much faster on one thread on a busy two-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Rank 64 makes LoRA's A matrices 64 x 64 = 4096 values: the smallest tensor bitsandbytes keeps 8-bit state for.
WIDE_LORA = {"name": "lora", "r": 64, "alpha": 64, "dropout": 0.0}
# Four steps with a checkpoint after two; weight decay on, so a frozen weight that reached the optimizer would move.
# Float32 throughout: mixed precision's levers store frozen weights their own way, and this is about the optimizer.
RUN = tiny_training(max_steps=4, save_steps=2, keep_checkpoints=None, weight_decay=0.1, bf16=False, report_to=[])

# Each optimizer with a different schedule, and the optimizer state that shows its options were used.
CASES: dict[str, tuple[dict[str, Any], tuple[str, torch.dtype]]] = {
    "adamw": (
        {"lr_scheduler": {"name": "cosine_with_min_lr", "min_lr_ratio": 0.1}, "warmup_ratio": 0.25},
        ("exp_avg_sq", torch.float32),
    ),
    "adamw_8bit": (
        {"optimizer": "adamw_8bit", "lr_scheduler": {"name": "polynomial", "power": 2.0}},
        ("state2", torch.uint8),
    ),
    "lion_8bit": (
        {"optimizer": "lion_8bit", "learning_rate": 1e-3, "lr_scheduler": "inverse_sqrt", "warmup_steps": 1},
        ("state1", torch.uint8),
    ),
    # relative_step with warmup_init: Adafactor's own step size, 1e-6 x step; beta1 keeps a first moment.
    "adafactor": (
        {"optimizer": {"name": "adafactor", "relative_step": True, "warmup_init": True, "beta1": 0.9}},
        ("exp_avg", torch.float32),
    ),
    "sgd": (
        {"optimizer": {"name": "sgd", "nesterov": True}, "lr_scheduler": "constant_with_warmup", "warmup_steps": 1},
        ("momentum_buffer", torch.float32),
    ),
}


@pytest.fixture
def trained(monkeypatch) -> list[tuple[Any, dict[str, torch.Tensor]]]:
    """(trainer, every parameter as training started) for each sft trainer finetune builds, in order."""
    runs: list[tuple[Any, dict[str, torch.Tensor]]] = []

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            runs[-1][1].update({n: p.detach().clone() for n, p in model.named_parameters()})

    def build(*args, real=llmtune.objectives.OBJECTIVES["sft"].build_trainer, **kwargs):
        trainer = real(*args, **kwargs)
        trainer.add_callback(Snapshot())
        runs.append((trainer, {}))
        return trainer

    monkeypatch.setattr(llmtune.objectives.OBJECTIVES["sft"], "build_trainer", build)
    return runs


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_moves_only_the_trained_weights_and_resumes_exactly(make_recipe, trained, case):
    changes, (state_key, state_dtype) = CASES[case]
    recipe = make_recipe(case, method=WIDE_LORA, training={**RUN, **changes})
    run = finetune(recipe).run.path
    trainer, start = trained[0]
    end = {n: p.detach() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and trainable < set(end)
    assert not [n for n in trainable if torch.equal(start[n], end[n])], "every trained weight moved"
    assert not [n for n in set(end) - trainable if not torch.equal(start[n], end[n])], "no frozen weight moved"
    state = trainer.optimizer.optimizer.state
    assert any(state_key in s and s[state_key].dtype == state_dtype for s in state.values()), list(state.values())[0]

    # Resume from the checkpoint after step 2: the same steps 3 and 4, the same weights.
    expected_losses, expected = losses(run), adapter(run)
    expected_rates = [e["learning_rate"] for e in log_entries(run) if "loss" in e]
    finetune(recipe, resume=run / "checkpoint-2")
    assert losses(run) == expected_losses
    assert [e["learning_rate"] for e in log_entries(run) if "loss" in e] == expected_rates
    got = adapter(run)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    if case == "adafactor":
        assert expected_rates == pytest.approx([1e-6, 2e-6, 3e-6, 4e-6]), "the log shows Adafactor's own step size"


def test_loraplus_gives_the_b_matrices_the_larger_learning_rate(make_recipe):
    lr, ratio = 1e-3, 16.0
    method = {**WIDE_LORA, "loraplus_lr_ratio": ratio, "modules_to_save": ["embed_tokens"]}
    training = tiny_training(max_steps=1, learning_rate=lr, optimizer="adamw_8bit", bf16=False, report_to=[])
    trainer = built_trainer(make_recipe(method=method, training=training))
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    # The rate each group's schedule starts from (the schedule has moved "lr" since).
    rate = {id(p): group["initial_lr"] for group in optimizer.param_groups for p in group["params"]}
    named = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(rate) == {id(p) for p in named.values()}, "every trained weight, and only those, is optimized"
    b = [n for n in named if "lora_B" in n]
    a = [n for n in named if "lora_A" in n or "embed_tokens" in n]
    assert b and a and len(a) + len(b) == len(named)
    assert {rate[id(named[n])] for n in b} == {lr * ratio}
    assert {rate[id(named[n])] for n in a} == {lr}
    # Through the recipe's 8-bit optimizer, with the embeddings' moments kept in 32 bits as the Trainer keeps them.
    state = {n: optimizer.state[p] for n, p in named.items()}
    assert {state[n]["state1"].dtype for n in named if "embed_tokens" in n} == {torch.float32}
    assert {state[n]["state1"].dtype for n in a if "lora_A" in n} == {torch.uint8}

    # bitsandbytes keeps such overrides process-wide by parameter position: the next 8-bit run must not inherit
    # them (finetune called twice in one process, a notebook).
    again = built_trainer(make_recipe("again", method=WIDE_LORA, training=training))
    again.train()
    states = again.optimizer.optimizer.state
    big = [p for p in again.model.parameters() if p.requires_grad and p.numel() >= 4096]
    assert big and {states[p]["state1"].dtype for p in big} == {torch.uint8}


def test_neftune_noises_the_embeddings_in_training_forwards_only(make_recipe):
    alpha = 5.0
    training = tiny_training(max_steps=1, neftune_noise_alpha=alpha, bf16=False, report_to=[])
    trainer = built_trainer(make_recipe(training=training))
    batch = chat_batch(trainer.processing_class)
    # training -> (rows in the batch, max |noise|, NEFTune's bound alpha / sqrt(length x hidden size))
    seen: dict[bool, list[tuple[int, float, float]]] = {True: [], False: []}
    eval_loss = {}

    def after_neftune(module, args, output):
        noise = (output - torch.nn.functional.embedding(args[0], module.weight)).abs().max().item()
        seen[module.training].append((output.size(0), noise, alpha / (output.size(1) * output.size(2)) ** 0.5))

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # Registered once the Trainer has put NEFTune's hook on, so it sees the noised output.
            model.get_input_embeddings().register_forward_hook(after_neftune)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            eval_loss["during"] = held_out_loss(model, batch)

    trainer.add_callback(Probe())
    trainer.train()
    eval_loss["after"] = held_out_loss(trainer.model, batch)  # NEFTune's hook is gone once training ends
    assert seen[True] and all(0 < noise <= bound for _, noise, bound in seen[True]), seen[True]
    # Padded rows, not rows end to end (which this data would get without NEFTune): the bound is per row's batch.
    assert {rows for rows, _, _ in seen[True]} == {training["batch_size"]}
    assert seen[False] and all(noise == 0 for _, noise, _ in seen[False])
    assert eval_loss["during"] == eval_loss["after"]


@torch.no_grad()
def held_out_loss(model, batch: dict[str, torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    loss = model(**batch).loss.item()
    model.train(was_training)
    return loss
