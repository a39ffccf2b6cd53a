"""Knowledge distillation on tiny:llama: the loss formula, the student built from a teacher, tokenizer checks, e2e."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import expect_error, ok, read_jsonl, run_cli, write_tiny_recipe

from llmtune.models import build_student, check_same_tokenizer, load_model, load_tokenizer
from llmtune.objectives import distillation_loss
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


# --- training and evaluation -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, one_torch_thread) -> Path:
    """A tuned teacher: tiny:llama trained in full on the counting task until its answers are confident."""
    root = tmp_path_factory.mktemp("teacher")
    training = {"max_steps": 12, "batch_size": 8, "learning_rate": 3e-3, "seed": 0, "logging_steps": 1}
    path = write_tiny_recipe(root, "teacher", method={"name": "full"}, training=training)
    return finetune(path).run.path


def test_distill_finetune_then_cli_eval_brings_the_student_to_the_teacher(teacher_run: Path, tmp_path: Path):
    objective = {"name": "distill", "teacher": str(teacher_run), "alpha": 0.0, "temperature": 1.0}
    training = {"max_steps": 10, "batch_size": 8, "learning_rate": 3e-3, "seed": 1, "logging_steps": 1}
    path = write_tiny_recipe(tmp_path, "student", method={"name": "full"}, objective=objective, training=training)
    run = finetune(path).run.path
    log = [entry for entry in read_jsonl(run / "trainer_log.jsonl") if "distill_divergence" in entry]
    assert len(log) == 10
    # alpha 0: the loss is the divergence alone, and it falls.
    assert log[0]["loss"] == pytest.approx(log[0]["distill_divergence"], rel=1e-4)
    assert log[-1]["distill_divergence"] < 0.5 * log[0]["distill_divergence"]

    result = ok(run_cli("eval", str(run), cwd=tmp_path))
    header = result.stdout.splitlines()[0].split()
    assert header == ["metric", "base", "tuned", "delta", "teacher"]
    evaluation = json.loads((run / "eval.json").read_text())
    assert set(evaluation) == {"tuned", "base", "teacher"}
    tuned, base, teacher = evaluation["tuned"], evaluation["base"], evaluation["teacher"]
    assert tuned["kl_to_teacher"] < 0.5 * base["kl_to_teacher"]
    # Closer to the teacher means closer to its perplexity on the data it was tuned for.
    assert abs(tuned["perplexity"] - teacher["perplexity"]) < abs(base["perplexity"] - teacher["perplexity"])
    predictions = read_jsonl(run / "eval_predictions.jsonl")
    assert set(predictions[0]["prediction"]) == {"tuned", "base", "teacher"}


def test_student_cut_from_a_tuned_teacher_trains_a_lora_adapter_and_evaluates(teacher_run: Path, tmp_path: Path):
    from llmtune.evaluation import evaluate
    from llmtune.merge import merge_adapter

    ref = str(teacher_run)
    objective = {"name": "distill", "teacher": ref, "student": {"from_teacher": "every_other_layer"}}
    path = write_tiny_recipe(tmp_path, "cut", model=ref, objective=objective)
    run = finetune(path).run.path
    assert (run / "adapter" / "adapter_config.json").is_file()
    report = evaluate(run)
    # The untrained student is the teacher cut in half: already near it, and the KL is reported for both.
    assert report.results["base"]["kl_to_teacher"] > 0
    assert report.results["tuned"]["kl_to_teacher"] > 0
    merged = merge_adapter(run, tmp_path / "merged")
    assert merged.max_abs_diff <= 1e-3 and merged.base_max_abs_diff > 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1
