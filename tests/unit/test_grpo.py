"""GRPO on tiny:llama: rule-based rewards, recipe checks, data, training that raises the reward, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import WORDS, expect_error, write_jsonl
from typer.testing import CliRunner

from llmtune import metrics
from llmtune.cli.app import app
from llmtune.data import prepare_data
from llmtune.models import load_tokenizer
from llmtune.recipe import load_recipe
from llmtune.run import finetune


def prompt_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [
        {"prompt": "Count: " + " ".join(["ab"] * ((i + offset) % 7 + 1)), "completion": WORDS[(i + offset) % 7 + 1]}
        for i in range(n)
    ]


def write_grpo_recipe(root: Path, **sections: Any) -> Path:
    write_jsonl(root / "data" / "train.jsonl", prompt_rows(24))
    write_jsonl(root / "data" / "eval.jsonl", prompt_rows(4, offset=3))
    recipe: dict[str, Any] = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "grpo", "reward": "exact_match", "num_generations": 4, "max_completion_length": 8},
        "data": {
            "train": "data/train.jsonl",
            "eval": "data/eval.jsonl",
            "format": "prompt_completion",
            "max_length": 64,
        },
        "training": {
            "max_steps": 2,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "save_steps": None,
            "report_to": [],
        },
        "eval": {"batch_size": 4, "max_new_tokens": 8},
        "output": {"dir": str(root / "runs" / "grpo")},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if key in ("data", "training", "objective") else value
    path = root / "grpo.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def read_log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


# --- rewards ---------------------------------------------------------------------------------------


def test_rewards_by_hand():
    completions = ["2024-02-29", " 2023-02-29 ", "2023-13-01", "3 July 1999", "1999-07-03"]
    references = ["2024-02-29", "2023-02-28", "2023-12-01", "1999-07-03", "1999-07-03"]
    assert metrics.exact_match_reward(completions, references) == [1.0, 0.0, 0.0, 0.0, 1.0]
    # 2023 is no leap year and there is no month 13: well-formed is not enough.
    assert metrics.iso_date_reward(completions, references) == [1.0, 0.0, 0.0, 0.0, 1.0]
    sim = metrics.similarity_reward(["1999-07-03", "1999-07-04", "banana"], ["1999-07-03"] * 3)
    assert sim[0] == 1.0 and sim[1] == pytest.approx(0.9) and sim[2] == 0.0


# --- recipe and data -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"training": {"batch_size": 6}}, "training.batch_size: grpo fills each step with whole groups"),
        ({"data": {"format": "text"}}, "data.format: grpo samples completions"),
        ({"objective": {"reward": ["exact_match", "iso_date"], "reward_weights": [1.0]}}, "reward_weights: 1 weights"),
        ({"objective": {"reward": "exact"}}, "objective.reward"),
        ({"objective": {"num_generations": 1}}, "objective.num_generations"),
    ],
)
def test_grpo_recipes_that_cannot_work_are_refused_at_load(tmp_path, sections, fragment):
    with expect_error(fragment):
        load_recipe(write_grpo_recipe(tmp_path, **sections))


def test_grpo_data_is_prompts_with_their_reference(tmp_path):
    recipe = load_recipe(write_grpo_recipe(tmp_path, data={"system_prompt": "Answer in one word.", "max_length": 128}))
    data = prepare_data(recipe, load_tokenizer("tiny:llama"))
    assert data.train.column_names == ["prompt", "reference"]
    assert data.train[0]["prompt"] == [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Count: ab"},
    ]
    assert data.train["reference"][:3] == ["one", "two", "three"]
    assert data.report["train"]["rows"] == 24


# --- training --------------------------------------------------------------------------------------


def test_grpo_raises_its_reward(tmp_path, one_torch_thread, monkeypatch):
    # The tiny random model never writes a right answer, so exact match gives every completion the same
    # reward and no signal. A reward it can move (the share of lower-case letters in its random bytes) stands
    # in for "similarity" to show that rewards reach the advantages and training follows them.
    def lower_case_share(completions: list[str], references: list[str]) -> list[float]:
        return [sum(ch.islower() for ch in c) / max(len(c), 1) for c in completions]

    monkeypatch.setitem(metrics.REWARDS, "similarity", lower_case_share)
    path = write_grpo_recipe(
        tmp_path, method={"name": "full"}, objective={"reward": "similarity"}, training={"max_steps": 20}
    )
    run = finetune(path).run.path
    rewards = [e["rewards/similarity/mean"] for e in read_log(run) if "loss" in e]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards


def test_grpo_e2e_finetune_eval_merge(tmp_path, one_torch_thread):
    path = write_grpo_recipe(tmp_path, objective={"reward": ["exact_match", "iso_date"], "reward_weights": [1, 0.5]})
    run = tmp_path / "runs" / "grpo"
    for args in (["finetune", str(path)], ["eval", str(run), "--compare-base"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    log = [e for e in read_log(run) if "loss" in e]
    assert [e["step"] for e in log] == [1, 2]
    for key in ("rewards/exact_match/mean", "rewards/iso_date/mean", "reward", "completions/mean_length"):
        assert all(key in e for e in log), key
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"base", "tuned"} and "exact_match" in results["tuned"]
    predictions = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == ["four", "five", "six", "seven"]
    result = CliRunner().invoke(app, ["merge-adapter", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output


def test_grpo_scores_with_a_reward_model_run(tmp_path, one_torch_thread):
    from test_preference import write_preference_recipe

    scorer = finetune(write_preference_recipe(tmp_path / "rm", objective={"name": "reward-model"})).run.path
    path = write_grpo_recipe(tmp_path, objective={"reward": [], "reward_model": str(scorer)}, training={"max_steps": 1})
    run = finetune(path).run.path
    [step] = [e for e in read_log(run) if "loss" in e]
    # One score per completion from the reward head: real numbers, not the 0/1 of a rule.
    assert step["rewards/reward_model/std"] > 0
    assert step["reward"] == pytest.approx(step["rewards/reward_model/mean"])


def test_grpo_reward_model_must_exist(tmp_path):
    with expect_error("objective.reward_model directory not found"):
        load_recipe(write_grpo_recipe(tmp_path, objective={"reward_model": "runs/missing"}))
