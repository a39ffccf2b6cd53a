"""`llmtune eval --harness`: lm-evaluation-harness tasks on a tiny tuned run and its base, recomputed by hand.

The task lives in tests/data/harness (a YAML and its jsonl), so everything runs offline.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import TESTS, expect_error, read_jsonl, write_classify_recipe, write_tiny_recipe
from typer.testing import CliRunner

from llmtune.cli.app import app, main
from llmtune.harness import evaluate_harness
from llmtune.models import load_tuned
from llmtune.run import finetune

TASKS = TESTS / "data" / "harness"
TASK = "llmtune_count_words"


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("harness")
    return finetune(write_tiny_recipe(root), ["training.save_steps=null"]).run.path


def choice_logps(model, tokenizer, rows: list[dict]) -> list[list[float]]:
    """Each choice's summed log-probability after its question, as the task's YAML words it: the continuation
    is " CHOICE", tokenized as the tail of question + continuation."""
    scores = []
    for row in rows:
        context = f"Count: {row['question']}\nAnswer:"
        per_choice = []
        for choice in row["choices"]:
            whole, head = tokenizer.encode(context + " " + choice), tokenizer.encode(context)
            with torch.no_grad():
                logps = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            per_choice.append(sum(logps[t - 1, whole[t]].item() for t in range(len(head), len(whole))))
        scores.append(per_choice)
    return scores


def by_hand(scores: list[list[float]], rows: list[dict]) -> dict[str, float]:
    """acc and acc_norm (log-likelihood per character of the choice) with lm-eval's standard error of a mean."""
    hits = {
        "acc": [max(range(len(s)), key=s.__getitem__) == r["answer"] for s, r in zip(scores, rows, strict=True)],
        "acc_norm": [
            max(range(len(s)), key=lambda i, s=s, r=r: s[i] / len(r["choices"][i])) == r["answer"]
            for s, r in zip(scores, rows, strict=True)
        ],
    }
    out = {}
    for name, values in hits.items():
        n, mean = len(values), sum(values) / len(values)
        out[f"{TASK}/{name}"] = mean
        out[f"{TASK}/{name}_stderr"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
    return out


def test_harness_scores_tuned_and_base_as_recomputed_from_the_models_own_likelihoods(
    tuned_run, tmp_path, monkeypatch, one_torch_thread
):
    # From elsewhere: the task's data_files are found next to its YAML, not in the working directory.
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["eval", str(tuned_run), "--harness", TASK, "--harness-include", str(TASKS), "--compare-base"]
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tuned_run / "harness.json").read_text())
    assert saved["tasks"] == {TASK: {"examples": 8, "documents": 8, "num_fewshot": 0}}

    rows = read_jsonl(TASKS / "count_words.jsonl")
    model, tokenizer = load_tuned(tuned_run)
    model.eval()
    tuned_scores = choice_logps(model, tokenizer, rows)
    with model.disable_adapter():
        base_scores = choice_logps(model, tokenizer, rows)
    # The adapter moved every likelihood, and the harness saw it: the columns are different models.
    assert all(
        abs(t - b) > 1e-4 for ts, bs in zip(tuned_scores, base_scores, strict=True) for t, b in zip(ts, bs, strict=True)
    )
    for column, scores in (("tuned", tuned_scores), ("base", base_scores)):
        expected = by_hand(scores, rows)
        assert saved["results"][column] == pytest.approx(expected, abs=1e-6), column
    assert saved["results"]["tuned"] != saved["results"]["base"]

    header, *lines = result.stdout.splitlines()  # stderr holds lm-eval's progress bars
    assert header.split() == ["metric", "base", "tuned", "delta"]
    acc = next(line.split() for line in lines if line.startswith(f"{TASK}/acc "))
    base, tuned = saved["results"]["base"][f"{TASK}/acc"], saved["results"]["tuned"][f"{TASK}/acc"]
    assert [float(v) for v in acc[1:]] == pytest.approx([base, tuned, tuned - base], abs=1e-4)
    assert f"{TASK}: 8 of 8 examples, 0-shot" in lines


def test_harness_limit_scores_the_first_examples_of_a_model_reference(tmp_path):
    report = evaluate_harness("tiny:llama", TASK, include=TASKS, limit=3, out=tmp_path / "h.json")
    assert list(report.results) == ["base"] and report.tasks[TASK]["examples"] == 3
    from llmtune.models import load_model, load_tokenizer

    rows = read_jsonl(TASKS / "count_words.jsonl")[:3]
    scores = choice_logps(load_model("tiny:llama", kind="causal-lm"), load_tokenizer("tiny:llama"), rows)
    assert report.results["base"] == pytest.approx(by_hand(scores, rows), abs=1e-6)
    assert json.loads((tmp_path / "h.json").read_text())["results"] == report.results


def test_a_hub_hosted_task_offline_is_one_line_and_exit_code_2(monkeypatch, capsys):
    import datasets

    # What HF_DATASETS_OFFLINE=1 sets when datasets is imported (here it already is).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    argv = ["llmtune", "eval", "tiny:llama", "--harness", "llmtune_hub_hosted", "--harness-include", str(TASKS)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert "'llmtune_hub_hosted' downloads its dataset from the Hugging Face Hub" in errors[0]
    assert "--harness-include DIR" in errors[0]


def test_an_unknown_task_names_its_close_matches():
    # Not in the include directory, so lm-eval's own index is read too (the slow part, once per process).
    with expect_error("unknown lm-eval task 'llmtune_count_wrods'", "close matches: llmtune_count_words"):
        evaluate_harness("tiny:llama", f"{TASK},llmtune_count_wrods", include=TASKS)


def test_a_missing_include_directory_is_refused(tmp_path):
    with expect_error(str(tmp_path / "nope"), "--harness-include"):
        evaluate_harness("tiny:llama", TASK, include=tmp_path / "nope")


def test_a_classifier_recipe_is_refused_before_its_model_loads(tmp_path):
    path = write_classify_recipe(tmp_path)
    with expect_error(str(path), "sequence-classification", "without --harness"):
        evaluate_harness(path, TASK, include=TASKS)
    with expect_error("--set", "model reference"):
        evaluate_harness("tiny:llama", TASK, include=TASKS, overrides=["eval.batch_size=2"])
