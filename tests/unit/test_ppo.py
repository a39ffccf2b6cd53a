"""PPO's pieces on numbers worked out by hand, and the recipes ppo and rloo refuse."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import expect_error, write_grpo_recipe, write_ppo_recipe
from torch.testing import assert_close

from llmtune.objectives.ppo import (
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_penalized_rewards,
    response_mask,
    whiten,
)
from llmtune.recipe import load_recipe


def test_gae_by_hand():
    # gamma 1, lambda 0.5: deltas 0.6-0.5, 0.7-0.6, 1-0.7; A2 = 0.3, A1 = 0.1 + 0.5 * 0.3, A0 = 0.1 + 0.5 * A1.
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    assert advantages.tolist()[0] == pytest.approx([0.225, 0.25, 0.3])
    assert returns.tolist()[0] == pytest.approx([0.725, 0.85, 1.0])


def test_gae_ends_each_response_at_its_last_token():
    # The third position is past the response: its reward and value (9) must not leak into the advantages.
    # gamma 0.9, lambda 1: A1 = 2 - 1 = 1; A0 = (0 + 0.9 * 1 - 0.5) + 0.9 * A1 = 1.3.
    rewards, values = torch.tensor([[0.0, 2.0, 5.0]]), torch.tensor([[0.5, 1.0, 9.0]])
    advantages, returns = gae(rewards, values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=0.9, lam=1.0)
    assert advantages.tolist()[0] == pytest.approx([1.3, 1.0, 0.0])
    assert returns.tolist()[0] == pytest.approx([1.8, 2.0, 0.0])


def test_kl_penalty_per_token_and_score_on_the_last_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -0.5, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([2.0, -1.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    assert_close(kl, torch.tensor([[0.5, 0.0, 0.0], [1.0, -0.5, 0.0]]))
    # -0.1 x KL at each token; the score at the row's last response token (position 1, then 2).
    assert_close(rewards, torch.tensor([[-0.05, 2.0, 0.0], [-0.1, 0.05, -1.0]]))


def test_clipped_policy_loss_by_hand():
    # Ratios 1.5, 0.5, 1 with advantages 1, 1, -1 and clip 0.2: max(-1.5, -1.2) = -1.2 (clipped),
    # max(-0.5, -0.8) = -0.5, max(1, 1) = 1; mean -0.7 / 3; one token of three clipped.
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0, 7.0]]))
    loss, clip_fraction = clipped_policy_loss(
        logprobs, torch.zeros(1, 4), torch.tensor([[1.0, 1.0, -1.0, 3.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]]), 0.2
    )
    assert loss.item() == pytest.approx(-0.7 / 3)
    assert clip_fraction.item() == pytest.approx(1 / 3)


def test_clipped_value_loss_by_hand():
    # Values move 0 -> 0.5 (clipped to 0.2) and 0 -> -0.1; returns 1: errors max(0.25, 0.64), max(1.21, 1.21).
    loss, clip_fraction = clipped_value_loss(
        torch.tensor([[0.5, -0.1]]), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2
    )
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)


def test_whiten_over_response_tokens_only():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = whiten(x, mask)
    # Over 1, 2, 3, 4, 5: mean 3, variance 2.
    assert_close(w, torch.tensor([[-2.0, -1.0, 0.0], [0.0, 1.0, 2.0]]) / math.sqrt(2))


def test_response_mask_ends_at_the_first_stop_token():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [3, 3, 3, 9]])
    assert response_mask(responses, [2, 9]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


@pytest.mark.parametrize(
    ("objective", "sections", "fragment"),
    [
        ({"reward_model": None}, {}, "reward: name at least one reward, or set reward_model"),
        ({"reward": "exact_match"}, {"training": {"grad_accum": 2}}, "training.grad_accum: ppo takes"),
        ({"reward": "exact_match", "minibatches": 3}, {}, "objective.minibatches: 3 does not divide"),
        ({"reward": "exact_match"}, {"method": {"name": "prompt"}}, "method prompt: ppo reads its value estimates"),
        ({"reward": "exact_match", "num_generations": 4}, {}, "objective.num_generations"),
        ({"reward": "exact_match"}, {"data": {"packing": True}}, "data.packing: ppo generates from single prompts"),
    ],
)
def test_ppo_recipes_that_cannot_work_are_refused_at_load(tmp_path, objective, sections, fragment):
    with expect_error(fragment):
        load_recipe(write_ppo_recipe(tmp_path, objective, **sections))


def test_rloo_shares_grpos_checks(tmp_path):
    with expect_error("training.batch_size: rloo fills each step with whole groups"):
        load_recipe(write_grpo_recipe(tmp_path, objective={"name": "rloo"}, training={"batch_size": 6}))
    with expect_error("method.target_modules: rloo reads the output head's weights directly"):
        load_recipe(
            write_grpo_recipe(
                tmp_path, objective={"name": "rloo"}, method={"name": "lora", "target_modules": ["q_proj", "lm_head"]}
            )
        )
    recipe = load_recipe(write_grpo_recipe(tmp_path, objective={"name": "rloo"}))
    assert recipe.objective.beta == 0.05 and load_recipe(write_grpo_recipe(tmp_path)).objective.beta == 0.0
