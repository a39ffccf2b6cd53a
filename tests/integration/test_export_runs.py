"""`llmtune export` on run directories: a LoRA run merged in memory and exported with its Modelfile, a full
fine-tune exported as it is, and the runs that cannot become one causal LM file refused before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import assert_one_line_error, expect_error, ok, run_cli, write_tiny_recipe

from llmtune.artifacts import create_run_dir, update_manifest
from llmtune.export import export_gguf
from llmtune.recipe import load_recipe
from llmtune.run import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SYSTEM = "Answer with one number word."


def chat_data(**extra) -> dict:
    return {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96, **extra}


def test_a_lora_run_exports_merged_with_a_modelfile_holding_its_system_prompt_and_stop_token(tmp_path: Path):
    recipe = write_tiny_recipe(tmp_path, data=chat_data(chat_template="chatml", system_prompt=SYSTEM))
    run = finetune(recipe).run.path
    result = ok(run_cli("export", str(run), "--ollama", cwd=tmp_path))
    out = run / "export" / "model-q8_0.gguf"
    assert out.is_file()
    assert "merge:" in result.stdout and "write: q8_0" in result.stdout
    verify = next(line for line in result.stdout.splitlines() if line.startswith("verify:"))
    assert "max |logit diff|" in verify and "on 4 probes" in verify  # the run's held-out rows
    lines = (run / "export" / "Modelfile").read_text().splitlines()
    assert lines[0] == "FROM ./model-q8_0.gguf"
    assert lines[1].startswith('TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}')
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert lines[-1] == f'SYSTEM """{SYSTEM}"""'
    assert sorted(p.name for p in (run / "export").iterdir()) == ["Modelfile", "model-q8_0.gguf"]

    again = run_cli("export", str(run), "--ollama", cwd=tmp_path)
    assert_one_line_error(again, "model-q8_0.gguf: already exists", "--overwrite")


def test_a_full_finetune_exports_its_own_weights(tmp_path: Path):
    run = finetune(write_tiny_recipe(tmp_path, method={"name": "full"})).run.path
    result = export_gguf(run, quant="f32", progress=lambda line: None)
    assert result.out == run / "export" / "model-f32.gguf"
    assert result.max_abs_diff == 0.0 and result.greedy_equal and result.probes == 4


def completed_run(tmp_path: Path, **sections) -> Path:
    """A run directory that says it completed, holding only its recipe: refusals must come before any load."""
    recipe = load_recipe(write_tiny_recipe(tmp_path, **sections))
    run = create_run_dir(tmp_path / "run", recipe, overwrite=False)
    update_manifest(run, status="completed")
    return run.path


@pytest.mark.parametrize(
    ("sections", "fragments"),
    [
        ({"method": {"name": "adapter"}}, ("bottleneck adapters", "nothing to merge")),
        ({"method": {"name": "prefix"}}, ("prefix tuning learns virtual tokens", "nothing to merge")),
        (
            {"objective": {"name": "classify", "labels": ["a", "b"]}, "data": chat_data(format="classification")},
            ("objective 'classify'", "sequence-classification", "causal language models"),
        ),
    ],
    ids=["bottleneck", "prefix", "classify"],
)
def test_runs_that_cannot_become_a_causal_lm_file_are_refused(tmp_path: Path, sections: dict, fragments):
    run = completed_run(tmp_path, **sections)
    with expect_error(*fragments):
        export_gguf(run, quant="f16")
    assert not (run / "export").exists()
