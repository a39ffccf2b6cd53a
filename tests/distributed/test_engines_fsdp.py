"""FSDP through llmtune on two CPU processes."""

from __future__ import annotations

import json
import subprocess
import sys


def test_fsdp_trains_with_two_cpu_processes(make_recipe, tmp_path):
    recipe = make_recipe(training={"max_steps": 2, "batch_size": 2, "fsdp": True, "logging_steps": 1})
    result = subprocess.run(
        [sys.executable, "-m", "llmtune", "finetune", str(recipe), "--nproc", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    # torchrun's failure summary alone is 1,500 characters; the workers' own errors come before it.
    assert result.returncode == 0, result.stderr[-8000:]
    run = tmp_path / "runs" / "tiny"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
    assert result.stdout.count("done:") == 1
