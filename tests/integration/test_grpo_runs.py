"""GRPO training in-process on tiny:llama: the reward rises, and a reward model run can score."""

from __future__ import annotations

import pytest
from helpers import log_entries as read_log
from helpers import write_grpo_recipe

from llmtune import metrics
from llmtune.run import finetune

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


def test_grpo_scores_with_a_reward_model_run(tmp_path, one_torch_thread):
    from test_preference import write_preference_recipe

    scorer = finetune(write_preference_recipe(tmp_path / "rm", objective={"name": "reward-model"})).run.path
    path = write_grpo_recipe(tmp_path, objective={"reward": [], "reward_model": str(scorer)}, training={"max_steps": 1})
    run = finetune(path).run.path
    [step] = [e for e in read_log(run) if "loss" in e]
    # One score per completion from the reward head: real numbers, not the 0/1 of a rule.
    assert step["rewards/reward_model/std"] > 0
    assert step["reward"] == pytest.approx(step["rewards/reward_model/mean"])
