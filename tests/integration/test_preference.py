"""Preference tuning (DPO and its relatives) on tiny:llama: data, loss at step 0, metrics, and the CLI end to end.

The learnable task: the prompt is "Count: ab ab ...", the chosen answer names the count in lower case, the
rejected one shouts it. A few steps teach a random tiny model which kind of answer is preferred, and the
held-out pairs (the same counts in a different order) show it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import WORDS, expect_error, write_jsonl
from typer.testing import CliRunner

from llmtune import metrics
from llmtune.cli.app import app
from llmtune.data import PreferenceSample, encode, encode_preference, prepare_data, split_samples
from llmtune.evaluation import evaluate
from llmtune.methods import METHODS, PEFT_TASK_TYPES
from llmtune.models import load_base_model, load_tokenizer
from llmtune.objectives import OBJECTIVES
from llmtune.recipe import load_recipe
from llmtune.run import finetune


def preference_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        k = (i + offset) % 7 + 1
        rows.append({"prompt": "Count: " + " ".join(["ab"] * k), "chosen": WORDS[k], "rejected": WORDS[k].upper()})
    return rows


def write_preference_recipe(root: Path, name: str = "dpo", train: list | None = None, **sections: Any) -> Path:
    write_jsonl(root / "data" / "train.jsonl", preference_rows(28) if train is None else train)
    write_jsonl(root / "data" / "eval.jsonl", preference_rows(8, offset=3))
    recipe: dict[str, Any] = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "dpo", "beta": 0.1},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "preference", "max_length": 64},
        "training": {
            "max_steps": 3,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "save_steps": None,
            "report_to": [],
        },
        "eval": {"batch_size": 8},
        "output": {"dir": str(root / "runs" / name)},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if key in ("data", "training") else value
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def build_trainer(recipe_path: Path):
    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    model = load_base_model(recipe)
    model = METHODS[recipe.method.name](recipe.method, model, tokenizer, task_type=PEFT_TASK_TYPES["causal-lm"])
    out = Path(recipe.output.dir)
    return OBJECTIVES[recipe.objective.name](recipe, model, tokenizer, data, out, callbacks=[])


# --- data ------------------------------------------------------------------------------------------


def test_pair_tokens_are_the_chosen_conversation_split_at_the_prompt(tmp_path):
    rows = [
        {
            "question": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count: ab ab"}],
            "good": [{"role": "assistant", "content": "two"}],
            "bad": "five",
        }
    ]
    path = write_preference_recipe(
        tmp_path,
        train=rows,
        data={"eval": None, "eval_split": 0, "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}},
    )
    recipe = load_recipe(path)
    tok = load_tokenizer("tiny:llama")
    [sample], _ = split_samples(recipe)
    assert isinstance(sample, PreferenceSample)
    prompt, chosen, rejected = encode_preference(sample, tok)
    ids, labels = encode(sample, tok)
    # prompt + chosen is the SFT encoding of the chosen conversation up to its EOS, which carries loss.
    assert prompt + chosen == ids[: len(prompt) + len(chosen)]
    assert all(t == -100 for t in labels[: len(prompt)])
    assert chosen[-1] == rejected[-1] == tok.eos_token_id
    assert tok.decode(chosen) == "two<|im_end|>"
    assert tok.decode(rejected) == "five<|im_end|>"
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        ({"prompt": "Count: ab", "chosen": "one"}, "column 'rejected' is missing, empty or not text"),
        ({"prompt": "Count: ab", "chosen": "one", "rejected": "  "}, "column 'rejected' is missing, empty or not text"),
        ({"prompt": "Count: ab", "chosen": "one", "rejected": "one"}, "'chosen' and 'rejected' are identical"),
        ({"prompt": "", "chosen": "one", "rejected": "two"}, "column 'prompt' is empty"),
    ],
)
def test_bad_pairs_fail_before_training_naming_file_and_row(tmp_path, row, fragment):
    path = write_preference_recipe(tmp_path, train=[*preference_rows(3), row])
    train_file = str((tmp_path / "data" / "train.jsonl").resolve())
    with expect_error(f"{train_file}: row 4:", fragment):
        split_samples(load_recipe(path))


@pytest.mark.parametrize(
    ("sections", "fragment"),
    [
        ({"data": {"packing": True}}, "data.packing: dpo compares a chosen and a rejected sequence"),
        ({"data": {"format": "chat"}}, "data.format: objective dpo trains on pairs of responses"),
        ({"objective": {"name": "sft"}}, "data.format: preference data needs a preference objective (dpo"),
        ({"objective": {"name": "dpo", "loss_type": "sigmod"}}, "objective.loss_type"),
        (
            {"method": {"name": "lora", "target_modules": ["q_proj", "lm_head"]}},
            "method.target_modules: dpo reads the output head's weights directly",
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_at_load(tmp_path, sections, fragment):
    with expect_error(fragment):
        load_recipe(write_preference_recipe(tmp_path, **sections))


def test_responses_over_max_length_are_cut_and_counted(tmp_path):
    long = {"prompt": "Count: ab", "chosen": "one " * 40, "rejected": "two " * 40}
    path = write_preference_recipe(tmp_path, train=[*preference_rows(3), long], data={"max_length": 80})
    recipe = load_recipe(path)
    data = prepare_data(recipe, load_tokenizer("tiny:llama"))
    assert data.report["train"]["truncated"] == 1
    columns = (data.train["prompt_ids"], data.train["chosen_ids"], data.train["rejected_ids"])
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in zip(*columns, strict=True)]
    assert max(lengths) == 80


# --- metrics ---------------------------------------------------------------------------------------


def test_preference_metrics_by_hand():
    chosen, rejected = [-1.0, -5.0, -2.0, -3.0], [-2.0, -4.0, -2.0, -7.0]
    assert metrics.preference_accuracy(chosen, rejected) == 50.0  # the tie is a miss
    assert metrics.mean_margin(chosen, rejected) == pytest.approx((1 - 1 + 0 + 4) / 4)
    with pytest.raises(ValueError):
        metrics.preference_accuracy([], [])


# --- training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [{"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, {"name": "full"}])
def test_dpo_loss_at_step_0_is_ln2(tmp_path, one_torch_thread, method):
    # Before any update the policy is the reference (adapter switched off, or the second copy), so every
    # log-ratio is 0 and the sigmoid loss is -log(sigmoid(0)) = ln 2, whatever the data.
    trainer = build_trainer(write_preference_recipe(tmp_path, method=method))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch).item()
    assert abs(loss - math.log(2)) < 1e-4, loss


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, one_torch_thread):
    """finetune -> eval --compare-base -> merge-adapter through the CLI, once for the module."""
    root = tmp_path_factory.mktemp("dpo")
    path = write_preference_recipe(root, training={"max_steps": 10})
    run = root / "runs" / "dpo"
    results = {
        "finetune": CliRunner().invoke(app, ["finetune", str(path)]),
        "eval": CliRunner().invoke(app, ["eval", str(run), "--compare-base"]),
        "merge": CliRunner().invoke(app, ["merge-adapter", str(run), "--out", str(root / "merged")]),
    }
    return run, results


def test_dpo_e2e_finetune_eval_merge(dpo_run):
    run, results = dpo_run
    for command, result in results.items():
        assert result.exit_code == 0, f"{command}: {result.output}\n{result.exception!r}"
    assert "preference_accuracy" in results["eval"].output
    assert "merged into" in results["merge"].output
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run.parent.parent / "merged" / "config.json").is_file()


def test_dpo_logs_reward_margins_and_accuracies(dpo_run):
    run, _ = dpo_run
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 11))
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected"):
        assert all(key in e for e in steps), key
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["rewards/margins"] > 0


def test_dpo_raises_heldout_preference_accuracy(dpo_run):
    run, _ = dpo_run
    results = json.loads((run / "eval.json").read_text())
    base, tuned = results["base"], results["tuned"]
    # The untrained tiny model prefers the right count on fewer than half of the held-out pairs.
    assert base["preference_accuracy"] < 50
    assert tuned["preference_accuracy"] >= 87.5
    assert tuned["logp_margin"] > base["logp_margin"] + 1.0


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
    trainer = build_trainer(write_preference_recipe(tmp_path, objective={"name": "kto"}))
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
