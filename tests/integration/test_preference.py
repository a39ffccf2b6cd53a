"""Preference tuning (DPO and its relatives) on tiny:llama: data, loss at step 0, metrics, and the CLI end to end.

The learnable task: the prompt is "Count: ab ab ...", the chosen answer names the count in lower case, the
rejected one shouts it. A few steps teach a random tiny model which kind of answer is preferred, and the
held-out pairs (the same counts in a different order) show it.
"""

from __future__ import annotations

import json
import math

import pytest
from helpers import built_trainer, write_preference_recipe

from llmtune.evaluation import evaluate
from llmtune.models import load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.recipe import load_recipe
from llmtune.run import finetune

# --- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, {"name": "full"}])
def test_dpo_loss_at_step_0_is_ln2(tmp_path, one_torch_thread, method):
    # Before any update the policy is the reference (adapter switched off, or the second copy), so every
    # log-ratio is 0 and the sigmoid loss is -log(sigmoid(0)) = ln 2, whatever the data.
    trainer = built_trainer(write_preference_recipe(tmp_path, method=method))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    assert abs(loss - math.log(2)) < 1e-4, loss


@pytest.mark.parametrize(
    ("objective", "margin", "logged"),
    [
        ("orpo", "logp_margin", "rewards/margins"),
        ("simpo", "logp_margin", "rewards/margins"),
        ("kto", "logp_margin", "rewards/margins"),
        ("reward-model", "reward_margin", "margin"),
    ],
)
def test_objective_trains_and_raises_heldout_preference_accuracy(tmp_path, one_torch_thread, objective, margin, logged):
    path = write_preference_recipe(tmp_path, objective={"name": objective}, training={"max_steps": 8})
    result = finetune(path)
    log = [json.loads(line) for line in (result.run.path / "trainer_log.jsonl").read_text().splitlines()]
    # KTO logs a margin only for batches holding both chosen and rejected responses.
    assert any(logged in e for e in log if "loss" in e)
    report = evaluate(result.run.path, compare_base=True)
    base, tuned = report.results["base"], report.results["tuned"]
    # (The untrained reward head is random: its base accuracy is chance, not the language model's 12.5.)
    assert tuned["preference_accuracy"] >= 87.5
    assert tuned["preference_accuracy"] > base["preference_accuracy"]
    assert tuned[margin] > base[margin] + 0.5


def test_kto_sees_every_response_once_with_its_label(tmp_path):
    trainer = built_trainer(write_preference_recipe(tmp_path, objective={"name": "kto"}))
    rows = trainer.train_dataset
    pairs = prepare_data(load_recipe(tmp_path / "dpo.yaml"), load_tokenizer("tiny:llama")).train
    expected = sorted(
        [(p, c, True) for p, c in zip(pairs["prompt_ids"], pairs["chosen_ids"], strict=True)]
        + [(p, r, False) for p, r in zip(pairs["prompt_ids"], pairs["rejected_ids"], strict=True)]
    )
    assert sorted(zip(rows["prompt_ids"], rows["completion_ids"], rows["label"], strict=True)) == expected
    # The KL estimate's completions come from the neighbouring row in the batch, not from the row itself.
    assert rows["KL_completion_ids"][1] == rows["completion_ids"][0]
    assert any(a != b for a, b in zip(rows["label"][:-1], rows["label"][1:], strict=True))


def test_reward_model_merges_into_a_sequence_classifier(tmp_path, one_torch_thread):
    from transformers import AutoModelForSequenceClassification

    from llmtune.merge import merge_adapter

    run = finetune(write_preference_recipe(tmp_path, objective={"name": "reward-model"})).run.path
    merged = merge_adapter(run, tmp_path / "merged")
    assert merged.max_abs_diff < 1e-4 and merged.base_max_abs_diff > 1e-3
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert model.config.num_labels == 1


def test_dpo_resumed_from_a_checkpoint_matches_the_uninterrupted_run(tmp_path, one_torch_thread):
    from safetensors.torch import load_file

    path = write_preference_recipe(tmp_path, training={"max_steps": 4, "save_steps": 2})
    run = finetune(path).run.path
    adapter = run / "adapter" / "adapter_model.safetensors"
    uninterrupted = load_file(adapter)
    finetune(path, resume=run / "checkpoint-2")
    resumed = load_file(adapter)
    assert max((uninterrupted[k] - resumed[k]).abs().max().item() for k in uninterrupted) < 1e-6
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2, 3, 4]  # the curve continues, no repeated steps
