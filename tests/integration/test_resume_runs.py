"""Checkpoints, stops and resume in-process on tiny:llama: full disks, non-finite losses, SIGTERM, resume errors."""

from __future__ import annotations

import errno
import os
import shlex
import signal
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import RESUME_TRAINING as TRAINING
from helpers import (
    assert_one_line,
    chat_rows,
    checkpoint_names,
    expect_error,
    fail_checkpoint_write,
    leftovers,
    losses,
    manifest,
    run_dir,
    varied_rows,
    write_jsonl,
)

from llmtune import methods
from llmtune.artifacts import COMPLETE_MARKER, complete_checkpoints
from llmtune.errors import LLMTuneError
from llmtune.recipe import load_recipe
from llmtune.run import finetune
from llmtune.training import NonFiniteLoss, StopOnSignalCallback, StopRequested

# The tiny models train much faster on one thread on a busy two-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_disk_full_during_a_checkpoint_write_is_a_one_line_error(make_recipe, monkeypatch):
    recipe = make_recipe(training={**TRAINING, "max_steps": 4, "save_steps": 2, "grad_accum": 1})
    fail_checkpoint_write(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with expect_error("disk full", "checkpoint-4", "earlier checkpoints are intact", "--resume"):
        finetune(recipe)
    run = run_dir(recipe)
    assert manifest(run)["status"] == "failed"
    assert checkpoint_names(run) == ["checkpoint-2"] and leftovers(run) == []


def test_disk_full_as_safetensors_reports_it_is_a_disk_full_error(make_recipe, monkeypatch):
    import peft.peft_model
    from safetensors import SafetensorError

    original = peft.peft_model.safe_save_file
    calls = {"n": 0}

    def save_file(*args, **kwargs):  # exactly what safetensors raises when the disk fills up (seen on a tmpfs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(*args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    recipe = make_recipe(training={**TRAINING, "max_steps": 4, "save_steps": 2, "grad_accum": 1})
    try:
        finetune(recipe)
        error = None
    except Exception as e:
        error = e
    if calls["n"] < 2:
        raise RuntimeError("the checkpoint's adapter was not written through peft.peft_model.safe_save_file")
    assert isinstance(error, LLMTuneError), f"{type(error).__name__}: {error}"
    assert_one_line(str(error))
    assert "disk full" in str(error) and "earlier checkpoints are intact" in str(error)
    assert checkpoint_names(run_dir(recipe)) == ["checkpoint-2"]


# --- 4. non-finite loss ----------------------------------------------------------------------------------


def hook_training_forwards(monkeypatch: pytest.MonkeyPatch, method: str, on_forward: Callable[[int, Any], Any]) -> None:
    """Build `method` as usual, then call `on_forward(n, output)` on the input embeddings' nth training forward
    (n from 1); a value it returns other than None replaces the embeddings' output."""
    build = methods.METHODS[method]
    calls = {"n": 0}

    def build_hooked(spec, model, tokenizer, **kwargs):
        tuned = build(spec, model, tokenizer, **kwargs)

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                return on_forward(calls["n"], output)
            return None

        tuned.get_input_embeddings().register_forward_hook(hook)
        return tuned

    monkeypatch.setitem(methods.METHODS, method, build_hooked)


# The memory plan's fake training step runs the hooked method's forward too, which would count as the first.
UNPLANNED = {"check_memory": False}


def poison_embeddings(monkeypatch: pytest.MonkeyPatch, method: str, first_bad_forward: int, value: float) -> None:
    """Build `method` as usual, then multiply the input embeddings by `value` from the Nth training forward on.

    (Not the logits: TRL computes the SFT loss from lm_head's weight directly, so lm_head's hooks never run.)
    """
    hook_training_forwards(monkeypatch, method, lambda n, output: output * value if n >= first_bad_forward else None)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(make_recipe, monkeypatch, value):
    recipe = make_recipe(training={**TRAINING, "max_steps": 8, "save_steps": 2, "grad_accum": 1, **UNPLANNED})
    poison_embeddings(monkeypatch, "lora", first_bad_forward=5, value=value)
    run = run_dir(recipe)
    with pytest.raises(NonFiniteLoss) as info:
        finetune(recipe)
    message = str(info.value)
    assert_one_line(message)
    assert "step 5" in message and str(run / "checkpoint-4") in message, message
    assert checkpoint_names(run) == ["checkpoint-2", "checkpoint-4"] and leftovers(run) == []
    assert manifest(run)["status"] == "failed"
    assert max(s for s, _ in losses(run)) == 4


# --- SIGTERM in-process: the stop, and the resume hint --------------------------------------------------


def signal_at_forward(monkeypatch: pytest.MonkeyPatch, method: str, nth: int, sig: int) -> None:
    """Send `sig` to this process during the Nth training forward: only once finetune's handler is installed."""

    def send(n, output):
        if n == nth:
            handler = signal.getsignal(sig)
            if not isinstance(getattr(handler, "__self__", None), StopOnSignalCallback):
                raise RuntimeError(f"no llmtune handler for {sig!r}; not signalling the test process")
            os.kill(os.getpid(), sig)
        return None

    hook_training_forwards(monkeypatch, method, send)


def test_sigterm_finishes_the_step_checkpoints_and_restores_handlers(make_recipe, monkeypatch):
    recipe = make_recipe(training={**TRAINING, "max_steps": 8, "save_steps": None, "grad_accum": 1, **UNPLANNED})
    signal_at_forward(monkeypatch, "lora", nth=3, sig=signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(StopRequested) as info:
        finetune(recipe)
    assert info.value.exit_code == 130
    assert_one_line(str(info.value))
    assert "SIGTERM" in str(info.value) and "--resume" in str(info.value)
    run = run_dir(recipe)
    assert checkpoint_names(run) == ["checkpoint-3"] and leftovers(run) == []
    assert manifest(run)["status"] == "interrupted"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_resume_hint_works_for_a_run_started_with_overrides(make_recipe, monkeypatch):
    recipe = make_recipe(training={**TRAINING, "max_steps": 6, "save_steps": None, "grad_accum": 1})
    signal_at_forward(monkeypatch, "lora", nth=2, sig=signal.SIGTERM)
    with pytest.raises(StopRequested) as info:
        finetune(recipe, ["training.learning_rate=0.02"])
    command = shlex.split(str(info.value).split("resume with: ", 1)[1])
    assert command[:2] == ["llmtune", "finetune"]
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    finetune(command[2], overrides, resume=True)  # what the user runs next, as the message says


@pytest.mark.parametrize(
    ("save_steps", "keep", "expected"),
    [(None, 2, ["checkpoint-3"]), (1, None, ["checkpoint-1", "checkpoint-2", "checkpoint-3"])],
    ids=["save_steps-null", "keep-null"],
)
def test_checkpoint_schedule(make_recipe, save_steps, keep, expected):
    recipe = make_recipe(training={**TRAINING, "max_steps": 3, "save_steps": save_steps, "keep_checkpoints": keep})
    run = finetune(recipe).run.path
    assert checkpoint_names(run) == expected and leftovers(run) == []


# --- 6. resume errors ------------------------------------------------------------------------------------


@pytest.fixture
def short_run(make_recipe) -> Path:
    recipe = make_recipe(training={**TRAINING, "max_steps": 2, "save_steps": 1, "grad_accum": 1})
    finetune(recipe)
    return recipe


def test_resume_without_a_run_directory(make_recipe):
    recipe = make_recipe()
    with expect_error(str(run_dir(recipe)), "no run to resume", "without --resume"):
        finetune(recipe, resume=True)
    assert not run_dir(recipe).exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [("training.learning_rate=0.02", "training.learning_rate"), ("method.r=8", "method.r")],
)
def test_resume_with_a_changed_recipe_names_the_key(short_run: Path, override: str, key: str):
    before = manifest(run_dir(short_run))
    with expect_error("recipe changed", key, "--overwrite"):
        finetune(short_run, [override], resume=True)
    assert manifest(run_dir(short_run)) == before


def test_resume_from_a_directory_without_complete(short_run: Path):
    run = run_dir(short_run)
    partial = run / "checkpoint-1"
    (partial / COMPLETE_MARKER).unlink()
    with expect_error(str(partial), "not a complete checkpoint", COMPLETE_MARKER):
        finetune(short_run, resume=partial)
    for checkpoint in complete_checkpoints(run):
        (checkpoint / COMPLETE_MARKER).unlink()
    with expect_error("no complete checkpoint"):
        finetune(short_run, resume=True)


def test_resume_refuses_changed_training_data(short_run: Path):
    train = short_run.parent / "data" / "train.jsonl"
    write_jsonl(train, chat_rows(30)[5:])
    try:
        finetune(short_run, resume=True)
    except LLMTuneError as e:
        assert_one_line(str(e))
        assert "data" in str(e)
        return
    raise AssertionError("resumed a run whose training data changed since its checkpoint")


# --- 9. the loss is token-weighted across gradient accumulation --------------------------------------------


def one_step_gradients(recipe_path: Path, out: Path) -> dict[str, Any]:
    """Gradients of the first optimizer step (before it is taken), its logged loss, and the rows it saw."""
    from transformers import TrainerCallback, set_seed

    from llmtune import accel
    from llmtune.models import load_model, load_tokenizer
    from llmtune.objectives import OBJECTIVES, prepare_data

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    set_seed(recipe.training.seed)
    model = methods.METHODS[recipe.method.name](recipe.method, load_model(recipe.model), tokenizer)
    with torch.no_grad():  # LoRA's B starts at zero, and so would every gradient of A
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    found: dict[str, Any] = {"rows": []}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            found["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                found["loss"] = logs["loss"]

    plan = accel.resolve(recipe, accel.current_device(), model, data.train)
    trainer = OBJECTIVES["sft"].build_trainer(recipe, model, tokenizer, data, out, [Capture()], plan)
    trainer.llmtune_loss = accel.apply(model, plan)
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        if "cu_seq_lens_q" in inputs:  # padding-free: the batch's rows end to end in one sequence
            bounds = inputs["cu_seq_lens_q"].tolist()
            for s, e in pairwise(bounds):
                found["rows"].append((inputs["input_ids"][0, s:e].tolist(), inputs["labels"][0, s:e].tolist()))
        else:
            for ids, mask, labels in zip(inputs["input_ids"], inputs["attention_mask"], inputs["labels"], strict=True):
                found["rows"].append((ids[mask.bool()].tolist(), labels[mask.bool()].tolist()))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    found["model"] = model
    return found


def test_grad_accum_gives_the_same_token_weighted_loss_and_gradients(make_recipe, tmp_path):
    # float32 throughout: the comparison is at 1e-5, below bf16 autocast's rounding.
    common = {"max_steps": 1, "logging_steps": 1, "learning_rate": 1e-9, "max_grad_norm": 1e9, "seed": 3, "bf16": False}
    recipes = {
        "b8": make_recipe("b8", training={**common, "save_steps": None, "batch_size": 8, "grad_accum": 1}),
        "b2": make_recipe("b2", training={**common, "save_steps": None, "batch_size": 2, "grad_accum": 4}),
    }
    write_jsonl(tmp_path / "data" / "train.jsonl", varied_rows(24))  # 4 to 25 loss-bearing tokens a row
    big = one_step_gradients(recipes["b8"], tmp_path / "b8")
    small = one_step_gradients(recipes["b2"], tmp_path / "b2")
    assert len(big["rows"]) == len(small["rows"]) == 8
    assert sorted(map(str, big["rows"])) == sorted(map(str, small["rows"])), "both steps see the same 8 rows"

    # Per-row sums of the loss at the weights of that step, one row at a time without padding.
    model = big["model"]
    model.eval()
    sums: dict[str, tuple[float, int]] = {}
    with torch.no_grad():
        for ids, labels in big["rows"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            nll = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            sums[str((ids, labels))] = (nll, int((target != -100).sum()))
    token_weighted = sum(n for n, _ in sums.values()) / sum(c for _, c in sums.values())
    # What a per-micro-batch mean averaged over the 4 micro-batches would give instead: the test must tell them apart.
    pairs = [[sums[str(row)] for row in small["rows"][i : i + 2]] for i in range(0, 8, 2)]
    naive = sum(sum(n for n, _ in pair) / sum(c for _, c in pair) for pair in pairs) / len(pairs)
    assert abs(naive - token_weighted) > 1e-3, "rows too alike to tell token weighting from batch averaging"
    assert big["loss"] == pytest.approx(token_weighted, abs=1e-5)
    assert small["loss"] == pytest.approx(token_weighted, abs=1e-5)

    assert big["grads"].keys() == small["grads"].keys()
    scale = max(g.abs().max().item() for g in big["grads"].values())
    assert scale > 1e-3
    diff = max((big["grads"][k] - small["grads"][k]).abs().max().item() for k in big["grads"])
    assert diff <= 1e-5, f"max |gradient difference| {diff:.3g} (largest gradient {scale:.3g})"
