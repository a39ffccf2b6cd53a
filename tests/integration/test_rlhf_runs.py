"""The RLHF objectives in-process on tiny:llama: ppo with a reward-model run (value head saved, resume), rloo with
a rule reward, and grpo's KL term against the adapter switched off."""

from __future__ import annotations

import pytest
import torch
from helpers import built_trainer, log_entries, write_grpo_recipe, write_ppo_recipe, write_preference_recipe
from safetensors.torch import load_file

from llmtune import metrics
from llmtune.evaluation import evaluate
from llmtune.models import load_model
from llmtune.objectives.ppo import VALUE_HEAD_FILE
from llmtune.run import finetune


@pytest.fixture
def reward_model_run(tmp_path):
    return finetune(write_preference_recipe(tmp_path / "rm", objective={"name": "reward-model"})).run.path


def test_ppo_trains_policy_and_value_head_from_a_reward_model_run(tmp_path, one_torch_thread, reward_model_run):
    path = write_ppo_recipe(
        tmp_path, {"reward_model": str(reward_model_run), "ppo_epochs": 2, "minibatches": 2}, training={"save_steps": 1}
    )
    run = finetune(path).run.path
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    head = load_file(run / VALUE_HEAD_FILE)
    hidden = load_model("tiny:llama").config.hidden_size
    assert head["weight"].shape == (1, hidden) and head["weight"].abs().sum() > 0  # it starts at zero
    steps = [e for e in log_entries(run) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2]
    for key in ("reward", "kl", "policy_loss", "value_loss", "clip_fraction", "entropy", "rewards/reward_model/mean"):
        assert all(key in e for e in steps), key
    # Step 1 samples from the untrained policy, which is its reference: no KL; after an update there is.
    assert steps[0]["kl"] == 0.0 and steps[1]["kl"] != 0.0
    assert steps[0]["reward"] == pytest.approx(steps[0]["rewards/reward_model/mean"])

    # Resuming from the first checkpoint repeats the second step exactly: rollout, value head and adapter.
    finished = {name: load_file(run / name) for name in (VALUE_HEAD_FILE, "adapter/adapter_model.safetensors")}
    finetune(path, resume=run / "checkpoint-1")
    for name, tensors in finished.items():
        for key, value in load_file(run / name).items():
            torch.testing.assert_close(value, tensors[key], msg=f"{name}: {key}")

    report = evaluate(run, compare_base=True)
    assert {"reward", "exact_match"} <= set(report.results["tuned"]) and "reward" in report.results["base"]


def lower_case_share(completions: list[str], references: list[str]) -> list[float]:
    """A reward the tiny random model can move (see test_grpo_runs): the share of lower-case letters it writes."""
    return [sum(ch.islower() for ch in c) / max(len(c), 1) for c in completions]


def test_rloo_learns_from_a_rule_reward_against_the_adapter_switched_off(tmp_path, one_torch_thread, monkeypatch):
    monkeypatch.setitem(metrics.REWARDS, "similarity", lower_case_share)
    path = write_grpo_recipe(tmp_path, objective={"name": "rloo", "reward": "similarity"})
    trainer = built_trainer(path)
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    trainer.train()
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert len(steps) == 2 and all("rewards/similarity/mean" in e for e in steps)
    assert steps[1]["kl"] != 0.0  # beta 0.05 by default: the KL to the reference is measured and penalised


def test_grpo_beta_with_lora_keeps_one_model_and_logs_kl(tmp_path, one_torch_thread, monkeypatch):
    monkeypatch.setitem(metrics.REWARDS, "similarity", lower_case_share)
    trainer = built_trainer(write_grpo_recipe(tmp_path, objective={"reward": "similarity", "beta": 0.1}))
    # No reference model and no copied "ref" adapter: the reference is the base with the adapter switched off.
    assert trainer.ref_model is None and list(trainer.model.peft_config) == ["default"]
    assert trainer.beta == 0.1
    trainer.train()
    kl = [e["kl"] for e in trainer.state.log_history if "loss" in e]
    assert kl[0] == 0.0 and kl[1] > 0  # the policy differs from the reference only after its first update


def test_grpo_beta_with_full_fine_tuning_loads_a_frozen_reference(tmp_path, one_torch_thread):
    trainer = built_trainer(write_grpo_recipe(tmp_path, method={"name": "full"}, objective={"beta": 0.1}))
    reference = trainer.ref_model
    assert reference is not None and not any(p.requires_grad for p in reference.parameters())
    policy = dict(trainer.model.named_parameters())
    for name, p in reference.named_parameters():
        assert p.data_ptr() != policy[name].data_ptr()
        torch.testing.assert_close(p, policy[name])
