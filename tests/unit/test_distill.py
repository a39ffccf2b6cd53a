"""Knowledge distillation on tiny:llama: the loss formula, the student built from a teacher, tokenizer checks, e2e."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import expect_error, write_tiny_recipe

from llmtune.models import build_student, check_same_tokenizer, load_model, load_tokenizer
from llmtune.objectives.distill import distillation_loss
from llmtune.recipe import load_recipe
from llmtune.run import finetune

# --- the loss --------------------------------------------------------------------------------------

# Batch of one row, 4 positions, vocabulary of 3. Position t predicts label t+1; labels 0 and 2 carry loss
# (label 1 is -100), so the loss-bearing predictions are positions 0 and 2.
STUDENT = [[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [2.0, -1.0, 0.0], [0.0, 0.0, 0.0]]]
TEACHER = [[[0.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]]
LABELS = [[-100, 2, -100, 1]]
LOSS_POSITIONS = [(0, 2), (2, 1)]  # (position, its target)


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(x / t) for x in row]
    return [e / sum(exps) for e in exps]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _hand_loss(t: float, alpha: float, divergence: str, beta: float = 0.5) -> float:
    ce = div = 0.0
    for pos, target in LOSS_POSITIONS:
        ce -= math.log(_softmax(STUDENT[0][pos], 1.0)[target])
        s, q = _softmax(STUDENT[0][pos], t), _softmax(TEACHER[0][pos], t)
        if divergence == "forward":
            div += _kl(q, s)
        elif divergence == "reverse":
            div += _kl(s, q)
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(q, s, strict=True)]
            div += beta * _kl(q, m) + (1 - beta) * _kl(s, m)
    n = len(LOSS_POSITIONS)
    return alpha * ce / n + (1 - alpha) * t**2 * div / n


@pytest.mark.parametrize(
    ("divergence", "beta", "t", "alpha"),
    [("forward", 0.0, 2.0, 0.5), ("reverse", 1.0, 1.5, 0.25), ("jsd", 0.3, 2.0, 0.0), ("forward", 0.0, 1.0, 1.0)],
)
def test_distillation_loss_equals_the_formula_on_a_hand_computed_case(divergence, beta, t, alpha):
    loss, ce, div = distillation_loss(
        torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), t, alpha, beta
    )
    assert loss.item() == pytest.approx(_hand_loss(t, alpha, divergence, beta), rel=1e-5)
    assert ce.item() == pytest.approx(_hand_loss(1.0, 1.0, divergence, beta), rel=1e-5)
    # The position whose label is -100 and the last position (it predicts nothing) must not count: changing
    # their logits, however much, leaves the loss as it was.
    noisy = torch.tensor(STUDENT)
    noisy[0, 1] = torch.tensor([50.0, -50.0, 3.0])
    noisy[0, 3] = torch.tensor([-9.0, 4.0, 7.0])
    assert distillation_loss(noisy, torch.tensor(TEACHER), torch.tensor(LABELS), t, alpha, beta)[0].item() == (
        pytest.approx(loss.item(), rel=1e-6)
    )
    # num_items (the Trainer's count over an accumulated batch) replaces this batch's token count.
    summed = distillation_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(LABELS), t, alpha, beta, 4)
    assert summed[0].item() == pytest.approx(loss.item() * len(LOSS_POSITIONS) / 4, rel=1e-5)


# --- the student -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_student_from_teacher_has_half_the_blocks_with_copied_weights(arch: str):
    teacher = load_model(f"tiny:{arch}", num_hidden_layers=4)
    student = build_student(teacher)
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    blocks = "model.layers" if arch == "llama" else "transformer.h"
    # Every student weight comes from the teacher: blocks 0 and 2 become 0 and 1, the rest keep their names.
    for name, tensor in s.items():
        source = name.replace(f"{blocks}.1.", f"{blocks}.2.")
        assert torch.equal(tensor, t[source]), name
    assert not torch.equal(s[f"{blocks}.1.{_some_block_weight(arch)}"], t[f"{blocks}.1.{_some_block_weight(arch)}"])
    ids = torch.tensor([[0, 40, 41, 42, 43]])
    with torch.no_grad():
        assert student(ids).logits.shape == teacher(ids).logits.shape
        # Generation works: the kept blocks' cache slots are renumbered 0..n-1.
        assert student.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 8)
    if arch == "gpt2":
        assert student.lm_head.weight is student.transformer.wte.weight  # the tie survives


def _some_block_weight(arch: str) -> str:
    return "mlp.up_proj.weight" if arch == "llama" else "mlp.c_fc.weight"


# --- checks before training ------------------------------------------------------------------------


def test_mismatched_tokenizers_are_refused_in_one_line():
    tok = load_tokenizer("tiny:llama")
    other = load_tokenizer("tiny:llama")
    other.add_tokens(["<extra>"])
    with expect_error("objective.teacher 'teacher-ref'", "vocabulary differs", "share a tokenizer"):
        check_same_tokenizer(tok, other, "teacher-ref")
    renamed = load_tokenizer("tiny:llama")
    renamed.pad_token = "<s>"
    with expect_error("special tokens differ", "pad_token"):
        check_same_tokenizer(tok, renamed, "teacher-ref")
    check_same_tokenizer(tok, load_tokenizer("tiny:llama"), "teacher-ref")


def test_mismatched_tokenizer_stops_finetune_before_training(tmp_path: Path):
    # A teacher checkpoint on disk whose tokenizer has one more token than the student's.
    teacher_dir = tmp_path / "teacher"
    load_model("tiny:llama").save_pretrained(teacher_dir)
    tok = load_tokenizer("tiny:llama")
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(teacher_dir)
    path = write_tiny_recipe(tmp_path, "bad", objective={"name": "distill", "teacher": str(teacher_dir)})
    with expect_error(str(teacher_dir), "vocabulary differs"):
        finetune(path)
    assert not (tmp_path / "runs" / "bad" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("objective", "fragments"),
    [
        (
            {"name": "distill", "teacher": "tiny:gpt2", "student": {"from_teacher": "every_other_layer"}},
            ("model must name the teacher", "'tiny:gpt2'"),
        ),
        ({"name": "distill", "teacher": "tiny:llama", "beta": 0.2}, ("beta is only used with divergence: jsd",)),
        ({"name": "distill", "teacher": "tiny:llama", "alpha": 1.5}, ("objective.alpha", "less than or equal to 1")),
    ],
)
def test_bad_distill_recipes_fail_at_load_time(tmp_path: Path, objective: dict[str, Any], fragments):
    with expect_error(*fragments):
        load_recipe(write_tiny_recipe(tmp_path, objective=objective))
