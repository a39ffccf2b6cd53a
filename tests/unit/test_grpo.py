"""GRPO on tiny:llama: rule-based rewards, recipe checks, data, training that raises the reward, and the CLI."""

from __future__ import annotations

import pytest
from helpers import expect_error, write_grpo_recipe

from llmtune import metrics
from llmtune.models import load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.recipe import load_recipe

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


def test_grpo_reward_model_must_exist(tmp_path):
    with expect_error("objective.reward_model directory not found"):
        load_recipe(write_grpo_recipe(tmp_path, objective={"reward_model": "runs/missing"}))
