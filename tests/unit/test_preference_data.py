"""Preference data and checks: pair tokens, bad pairs, refused combinations, length cuts, the metrics by hand."""

from __future__ import annotations

import pytest
from helpers import expect_error, preference_rows, write_preference_recipe

from llmtune import metrics
from llmtune.data import PreferenceSample, encode, encode_preference, split_samples
from llmtune.models import load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.recipe import load_recipe

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
