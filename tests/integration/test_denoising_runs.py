"""Objectives mlm and span-corruption end to end on tiny:bert / tiny:t5: finetune with LoRA and in full, eval against
the base on the same held-out masks, merge-adapter, and what generate, serve and export do with such a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import expect_error, write_denoising_recipe

from llmtune.evaluation import evaluate
from llmtune.export import export_gguf
from llmtune.generation import complete, load_generator
from llmtune.merge import merge_adapter
from llmtune.run import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_recipe(root: Path, objective: str, method: str) -> Path:
    spec = {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0} if method == "lora" else {"name": "full"}
    lr = 1e-2 if method == "lora" else 3e-3
    return write_denoising_recipe(
        root,
        objective,
        method=spec,
        training={"max_steps": 6, "batch_size": 8, "learning_rate": lr, "seed": 0, "logging_steps": 2},
    )


@pytest.fixture(
    scope="module", params=[("mlm", "lora"), ("mlm", "full"), ("span-corruption", "lora"), ("span-corruption", "full")]
)
def trained(request, tmp_path_factory) -> tuple[str, str, Path]:
    objective, method = request.param
    root = tmp_path_factory.mktemp(f"{objective}-{method}")
    result = finetune(write_recipe(root, objective, method))
    return objective, method, result.run.path


def test_tuned_restores_held_out_tokens_better_than_base_on_the_same_masks(trained):
    objective, _, run = trained
    report = evaluate(run, compare_base=True)
    base, tuned = report.results["base"], report.results["tuned"]
    assert set(base) == set(tuned) == {"accuracy", "perplexity", "loss"}
    assert tuned["perplexity"] < base["perplexity"] and tuned["accuracy"] > base["accuracy"]
    assert abs(tuned["perplexity"] - 2.718281828 ** tuned["loss"]) < 1e-6 * tuned["perplexity"]
    assert json.loads((run / "eval.json").read_text())["tuned"] == tuned
    # The same masks every time: a second eval reproduces the numbers exactly.
    assert evaluate(run, compare_base=True).results == report.results
    if objective == "mlm":
        assert any("no masked-LM head" in note for note in report.notes)


def test_merge_adapter_folds_lora_into_the_encoder(trained, tmp_path):
    objective, method, run = trained
    if method != "lora":
        with expect_error("trained the weights themselves", "no merge needed"):
            merge_adapter(run, tmp_path / "merged")
        return
    result = merge_adapter(run, tmp_path / "merged")
    assert result.max_abs_diff <= 1e-3 and result.reload_max_abs_diff <= 1e-3 and result.base_max_abs_diff > 1e-3
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM" if objective == "mlm" else "T5ForConditionalGeneration"]


def test_generate_fills_masks_and_other_commands_refuse_an_mlm_run(trained):
    objective, method, run = trained
    if objective != "mlm" or method != "lora":
        pytest.skip("one masked LM run is enough")
    out = complete(str(run), "one two [MASK] four [MASK] six")
    lines = out.splitlines()
    assert len(lines) == 3 and "[MASK]" not in lines[0]
    assert lines[1].startswith("[MASK] 1: ") and lines[2].startswith("[MASK] 2: ")
    assert len(lines[1].split(", ")) == 5  # the five most probable tokens with their probabilities
    with expect_error("the prompt has no [MASK]"):
        complete(str(run), "one two three")
    with expect_error("is a masked language model", "does not generate", f"llmtune generate {run} 'TEXT with [MASK]'"):
        load_generator(run)  # what serve and chat load
    with expect_error("objective 'mlm' trains a masked-lm model", "GGUF export writes causal language models"):
        export_gguf(run, run.parent / "out.gguf")


def test_an_mlm_recipe_on_a_decoder_or_a_t5_is_refused(tmp_path):
    with expect_error("model 'tiny:llama' has no masked-lm form; use tiny:bert for objective mlm"):
        finetune(write_denoising_recipe(tmp_path, "mlm", model="tiny:llama"))
    with expect_error("model 'tiny:bert' has no seq2seq-lm form; use tiny:t5"):
        finetune(write_denoising_recipe(tmp_path, "span-corruption", model="tiny:bert"))


def test_a_run_resumed_in_its_second_epoch_ends_with_the_weights_of_the_uninterrupted_run(tmp_path):
    import shutil

    from safetensors.torch import load_file

    training = {"max_steps": 5, "batch_size": 16, "learning_rate": 1e-2, "seed": 0, "save_steps": 2}
    recipe = write_denoising_recipe(tmp_path, "mlm", training=training)
    run = finetune(recipe).run.path
    straight = load_file(run / "adapter" / "adapter_model.safetensors")
    # Resumed from step 4, past the end of the first epoch (3 steps of 16 rows): masks of epoch 1 must be redrawn
    # exactly, whatever the loader fetched ahead before the checkpoint.
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(run / "checkpoint-4", checkpoint)
    finetune(recipe, resume=checkpoint)
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
