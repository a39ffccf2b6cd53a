"""A real tiny run and the Hub: finetune with output.push_to_hub against a Hub that cannot be reached keeps the run
complete and prints the retry, and the retry (merged, to a fake Hub) uploads a model that loads without peft."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import fake_hub, probe_logits, run_cli, write_tiny_recipe

from llmtune import artifacts
from llmtune.push import files_to_push, push

REPO_ID = "me/tiny-lora"
# What tiny:llama's tokenizer saves, then the model card, the resolved recipe and the metrics (no eval.json: the
# run is not evaluated).
TOKENIZER_AND_RECORDS = [
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "recipe.yaml",
    "metrics.json",
]


@pytest.fixture(scope="module")
def failed_push(tmp_path_factory):
    """`llmtune finetune` of a tiny LoRA recipe whose push_to_hub points at a closed port: (run dir, the result)."""
    root = tmp_path_factory.mktemp("push")
    recipe = write_tiny_recipe(
        root, "lora", output={"dir": str(root / "runs" / "lora"), "push_to_hub": {"repo_id": REPO_ID}}
    )
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}
    return root / "runs" / "lora", run_cli("finetune", str(recipe), cwd=root, env=env)


def test_failed_push_keeps_the_run_complete_and_prints_the_retry(failed_push):
    run, result = failed_push
    assert result.returncode != 0 and "Traceback" not in result.stderr
    # stderr also carries the training progress bar; the error is its last line, and its only one.
    *_, line = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and result.stderr.count("error:") == 1
    assert f"pushing {run} to the Hub as {REPO_ID}" in result.stdout
    assert f"the run is saved and complete at {run}" in line
    assert "could not reach the Hugging Face Hub" in line and f"retry with: llmtune push {run} {REPO_ID}" in line
    assert json.loads((run / artifacts.MANIFEST_FILE).read_text())["status"] == "completed"
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "README.md").is_file()


def test_a_real_lora_run_uploads_exactly_these_files(failed_push):
    run, _ = failed_push
    expected = ["adapter_config.json", "adapter_model.safetensors", *TOKENIZER_AND_RECORDS]
    assert sorted(name for _, name in files_to_push(run)) == sorted(expected)


def test_merged_retry_uploads_a_standalone_model_with_the_runs_records(failed_push, monkeypatch, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    from llmtune.models import load_tuned

    run, _ = failed_push
    calls = fake_hub(monkeypatch)
    result = push(run, REPO_ID, private=True, merged=True, token="hf_test")
    files = calls[-1][1]["files"]
    assert sorted(files) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", *TOKENIZER_AND_RECORDS]
    )
    assert sorted(result.files) == sorted((name, len(data)) for name, data in files.items())
    assert "library_name: transformers" in files["README.md"].decode()  # the merged model's card, not the adapter's
    # What the Hub received loads with plain transformers and computes what the run's base + adapter computes.
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path)
    tuned, _ = load_tuned(run)
    assert torch.allclose(probe_logits(merged), probe_logits(tuned), atol=1e-4)
