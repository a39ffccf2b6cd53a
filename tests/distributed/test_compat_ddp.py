"""The compatibility matrix's distributed column: each method it marks tested trains under torchrun, 2 CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from compat_matrix import MATRIX, TESTED
from helpers import (
    COMPAT_STEPS,
    check_compat_run,
    free_port,
    write_compat_recipe,
)

from llmtune import artifacts

NPROC = 2

# --- the distributed job ---------------------------------------------------------------------------

# Runs under torchrun: trains every recipe given in turn through llmtune.run.finetune and writes, per rank,
# what each run trained (world size, a digest of the trainable weights, tensors that did not move).
DDP_SCRIPT = r"""
import hashlib, json, os, sys
from pathlib import Path

import torch

import llmtune.objectives
from llmtune.run import finetune

out, recipes = Path(sys.argv[1]), sys.argv[2:]
rank = os.environ["RANK"]
build = llmtune.objectives.OBJECTIVES["sft"].build_trainer
seen = {}


def dump():
    (out / f"rank{rank}.json").write_text(json.dumps(seen))


def watched(recipe, model, *args, **kwargs):
    trainer = build(recipe, model, *args, **kwargs)
    train = trainer.train

    def train_and_digest(*a, **k):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        result = train(*a, **k)
        digest = hashlib.sha256()
        unmoved = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                digest.update(name.encode())
                digest.update(p.detach().cpu().float().numpy().tobytes())
                if torch.equal(before[name], p.detach()):
                    unmoved.append(name)
        seen[recipe.method.name] = {
            "world_size": trainer.args.world_size,
            "digest": digest.hexdigest(),
            "trainable": len(before),
            "unmoved": unmoved,
        }
        return result

    trainer.train = train_and_digest
    return trainer


llmtune.objectives.OBJECTIVES["sft"].build_trainer = watched
for recipe in recipes:
    finetune(recipe)
    dump()

# Load a tiny QLoRA base again, now that the process group is up (as in a second finetune of the same process).
from llmtune.models import load_model
from llmtune.recipe import QLoraSpec

error = None
try:
    load_model("tiny:llama", "float32", QLoraSpec(name="qlora"))
except Exception as e:
    error = f"{type(e).__name__}: {e}"
seen["_qlora_base_after_init"] = {"group_up": torch.distributed.is_initialized(), "error": error}
dump()
"""


@dataclass
class DistributedJob:
    result: subprocess.CompletedProcess
    runs: dict[str, Path]
    ranks: list[dict[str, Any]]

    def output_tail(self) -> str:
        return f"exit {self.result.returncode}\n{(self.result.stdout + self.result.stderr)[-4000:]}"


@pytest.fixture(scope="module")
def distributed(tmp_path_factory) -> DistributedJob:
    root = tmp_path_factory.mktemp("compat-ddp")
    # In matrix order: qlora's tiny base is built after lora's run has brought the process group up.
    methods = [m for m, row in MATRIX.items() if row["distributed"][0] == TESTED]
    runs = {m: write_compat_recipe(root, m, m) for m in methods}
    script = root / "train_all.py"
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC)]
    command += ["--master_port", str(free_port()), str(script), str(root), *map(str, runs.values())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=420)
    ranks = []
    for rank in range(NPROC):
        path = root / f"rank{rank}.json"
        ranks.append(json.loads(path.read_text()) if path.is_file() else {})
    return DistributedJob(result, {m: root / "runs" / m for m in methods}, ranks)


def prove_distributed(distributed: DistributedJob, method: str) -> None:
    reports = [rank.get(method) for rank in distributed.ranks]
    assert all(reports), f"{method}: no report from every rank\n{distributed.output_tail()}"
    for report in reports:
        assert report["world_size"] == NPROC
        assert report["trainable"] > 0 and not report["unmoved"], report
    assert reports[0]["digest"] == reports[1]["digest"], "the replicas' trainable weights differ after training"
    run = distributed.runs[method]
    check_compat_run(run, method)
    checkpoints = artifacts.complete_checkpoints(run)
    assert [c.name for c in checkpoints] == [f"checkpoint-{COMPAT_STEPS}"]
    for rank in range(NPROC):
        assert (checkpoints[0] / f"rng_state_{rank}.pth").is_file(), sorted(p.name for p in checkpoints[0].iterdir())


def test_tiny_qlora_base_loads_once_the_process_group_is_up(distributed: DistributedJob):
    probes = [rank.get("_qlora_base_after_init") for rank in distributed.ranks]
    assert all(probes), distributed.output_tail()
    assert all(p["group_up"] for p in probes)
    assert [p["error"] for p in probes] == [None] * NPROC


@pytest.mark.parametrize(
    ("method", "feature"),
    [
        pytest.param(m, "distributed", id=f"{m}-distributed")
        for m, row in MATRIX.items()
        if row["distributed"][0] == TESTED
    ],
)
def test_tested_cell(distributed: DistributedJob, method: str, feature: str):
    prove_distributed(distributed, method)
