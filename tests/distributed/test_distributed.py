"""Multi-process training (issue 7, part 5): 2 CPU processes (gloo DDP) on tiny:llama.

Four jobs, started together in one module fixture:
- `python -m torch.distributed.run --nproc_per_node 2 -m llmtune finetune RECIPE` (torchrun as users type it);
- `python -m llmtune finetune RECIPE --nproc 2` (llmtune relaunches itself under torchrun);
- a launcher script under torchrun that wraps the sft trainer's `get_train_dataloader` to record the rows each
  rank draws, then runs the real CLI (`llmtune.cli.app.main`): the ranks must draw disjoint shards;
- two torchrun "nodes" on 127.0.0.1 (`--nnodes 2`, one process each, c10d rendezvous) sharing one run
  directory, through a launcher that saves each rank's trained weights at the end: the replicas must be
  identical and equal to the single-node job's adapter.

Each must train one job: one adapter, one trainer log with every step once, a completed manifest, checkpoints
holding both ranks' RNG states, and the summary printed once, by rank 0.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import chat_rows, free_port, save_recipe, write_jsonl

from llmtune import artifacts
from llmtune.evaluation import evaluate
from llmtune.models import load_tokenizer, load_tuned
from llmtune.objectives import prepare_data
from llmtune.recipe import load_recipe

NPROC = 2
ROWS = 24
BATCH = 4
STEPS = 2  # the torchrun and --nproc jobs; checkpoint every step
EPOCH_STEPS = ROWS // (BATCH * NPROC)  # the shard job trains exactly one epoch: 3 steps
LAUNCHERS = ["torchrun", "nproc", "nodes"]

# Runs under torchrun: records, per rank, the rows (input_ids without padding) of every batch it draws.
SHARD_LAUNCHER = r"""
import json, os, sys
from pathlib import Path

import llmtune.objectives

out = Path(sys.argv[1])
rank = os.environ["RANK"]
build = llmtune.objectives.OBJECTIVES["sft"].build_trainer
drawn = []


class Recording:
    # The Trainer only takes len() of its dataloader, iterates it and reads attributes: pass those through.
    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        for batch in self._loader:
            if "cu_seq_lens_q" in batch:  # padding-free: the batch's rows end to end in one sequence
                flat, bounds = batch["input_ids"][0].tolist(), batch["cu_seq_lens_q"].tolist()
                rows = [flat[s:e] for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
            else:
                mask = batch["attention_mask"].tolist()
                rows = [[t for t, keep in zip(ids, m) if keep] for ids, m in zip(batch["input_ids"].tolist(), mask)]
            drawn.append(rows)
            (out / f"rank{rank}.json").write_text(json.dumps(drawn))
            yield batch


def recording_build(*args, **kwargs):
    trainer = build(*args, **kwargs)
    make_loader = trainer.get_train_dataloader
    trainer.get_train_dataloader = lambda *a, **k: Recording(make_loader(*a, **k))
    return trainer


llmtune.objectives.OBJECTIVES["sft"].build_trainer = recording_build

from llmtune.cli.app import main

sys.argv = ["llmtune", *sys.argv[2:]]
main()
"""


# Runs under torchrun: saves, per rank, the trainable weights as they are when training ends.
REPLICA_LAUNCHER = r"""
import os, sys
from pathlib import Path

from safetensors.torch import save_file
from transformers import TrainerCallback

import llmtune.objectives

out = Path(sys.argv[1])
build = llmtune.objectives.OBJECTIVES["sft"].build_trainer


class SaveReplica(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trained, out / f"replica{os.environ['RANK']}.safetensors")


def replica_build(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.add_callback(SaveReplica())
    return trainer


llmtune.objectives.OBJECTIVES["sft"].build_trainer = replica_build

from llmtune.cli.app import main

sys.argv = ["llmtune", *sys.argv[2:]]
main()
"""


def numbered_rows(n: int) -> list[dict[str, Any]]:
    """chat_rows with the row number in each question: every row tokenizes differently."""
    rows = chat_rows(n)
    for i, row in enumerate(rows):
        row["messages"][0]["content"] = f"[{i}] " + row["messages"][0]["content"]
    return rows


def write_recipe(root: Path, name: str, **training: Any) -> Path:
    recipe = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
        "training": {
            "max_steps": STEPS,
            "batch_size": BATCH,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "save_steps": 1,
            **training,
        },
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "output": {"dir": str(root / "runs" / name)},
    }
    return save_recipe(root, name, recipe)


@dataclass
class Job:
    result: subprocess.CompletedProcess
    recipe: Path
    run: Path

    def __str__(self) -> str:
        out, err = self.result.stdout[-3000:], self.result.stderr[-3000:]
        return f"exit {self.result.returncode}\nstdout:\n{out}\nstderr:\n{err}"

    def lines(self, prefix: str) -> list[str]:
        return [line for line in self.result.stdout.splitlines() if line.startswith(prefix)]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict[str, Job]:
    root = tmp_path_factory.mktemp("ddp")
    write_jsonl(root / "data" / "train.jsonl", numbered_rows(ROWS))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(4))
    (root / "shard_launcher.py").write_text(SHARD_LAUNCHER, encoding="utf-8")
    (root / "replica_launcher.py").write_text(REPLICA_LAUNCHER, encoding="utf-8")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC)]
    recipes = {
        "torchrun": write_recipe(root, "torchrun"),
        "nproc": write_recipe(root, "nproc"),
        "shards": write_recipe(root, "shards", max_steps=EPOCH_STEPS, save_steps=None),
        "nodes": write_recipe(root, "nodes"),
    }
    commands = {
        "torchrun": [*torchrun, "--master_port", str(free_port()), "-m", "llmtune", "finetune", recipes["torchrun"]],
        # --nproc names no port: torchrun then rendezvouses on a free port of its own choosing.
        "nproc": [sys.executable, "-m", "llmtune", "finetune", recipes["nproc"], "--nproc", str(NPROC)],
        "shards": [*torchrun, "--master_port", str(free_port()), root / "shard_launcher.py", root, "finetune"]
        + [recipes["shards"]],
    }
    # What each node of a real cluster runs, with the first node's address as the rendezvous endpoint.
    endpoint = f"127.0.0.1:{free_port()}"
    for node in range(NPROC):
        commands[f"nodes/{node}"] = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(NPROC), "--nproc_per_node", "1",
            "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "nodes",
            root / "replica_launcher.py", root, "finetune", recipes["nodes"],
        ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # Started together so one job's interpreter start-up overlaps another's training.
    procs = {
        name: subprocess.Popen(
            [str(arg) for arg in command], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, command in commands.items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    # The nodes' job is what the two nodes printed together; it failed if either node did.
    nodes = [results.pop(f"nodes/{node}") for node in range(NPROC)]
    results["nodes"] = subprocess.CompletedProcess(
        [n.args for n in nodes],
        max(n.returncode for n in nodes),
        "".join(n.stdout for n in nodes),
        "".join(n.stderr for n in nodes),
    )
    return {name: Job(result, recipes[name], root / "runs" / name) for name, result in results.items()}


@pytest.fixture(params=LAUNCHERS)
def job(request, jobs) -> Job:
    job = jobs[request.param]
    assert job.result.returncode == 0, str(job)
    return job


def test_summary_lines_are_printed_once_by_rank_zero(job: Job):
    assert len(job.lines("done: ")) == 1, str(job)
    assert f"{STEPS} steps" in job.lines("done: ")[0]
    assert len(job.lines("next: ")) == 1, str(job)
    assert len(job.lines("data train:")) == 1 and len(job.lines("method lora:")) == 1, str(job)


def test_one_adapter_is_written(job: Job):
    adapter = job.run / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file()
    outside_checkpoints = [
        p for p in job.run.rglob("adapter_model.safetensors") if not p.parent.name.startswith("checkpoint-")
    ]
    assert outside_checkpoints == [adapter]
    assert not (job.run / "model").exists()
    # No staging directory (a dot-name) was left behind by either rank.
    assert not [p.name for p in job.run.iterdir() if p.name.startswith(".")]


def test_trainer_log_has_each_step_once(job: Job):
    entries = [json.loads(line) for line in (job.run / artifacts.TRAINER_LOG_FILE).read_text().splitlines()]
    assert [e["step"] for e in entries if "loss" in e] == list(range(1, STEPS + 1))
    assert len([e for e in entries if "train_loss" in e]) == 1
    assert len([e for e in entries if "eval_loss" in e]) == 1


def test_manifest_completed_and_metrics_written_once(job: Job):
    assert json.loads((job.run / artifacts.MANIFEST_FILE).read_text())["status"] == "completed"
    metrics = json.loads((job.run / artifacts.METRICS_FILE).read_text())
    assert metrics["steps"] == STEPS and math.isfinite(metrics["train_loss"])


def test_checkpoints_hold_both_ranks_rng_states(job: Job):
    checkpoints = sorted(p for p in job.run.iterdir() if p.name.startswith("checkpoint-"))
    assert [p.name for p in checkpoints] == [f"checkpoint-{step}" for step in range(1, STEPS + 1)]
    for checkpoint in checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        expected = {artifacts.COMPLETE_MARKER, "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"}
        assert expected <= names, sorted(names)
        assert not [n for n in names if n.startswith("rng_state_") and n not in expected]
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        assert f"checkpoint-{state['global_step']}" == checkpoint.name


def test_ranks_draw_disjoint_shards_that_cover_the_epoch(jobs: dict[str, Job]):
    job = jobs["shards"]
    assert job.result.returncode == 0, str(job)
    assert len(job.lines("done: ")) == 1, str(job)
    recipe = load_recipe(job.recipe)
    train = prepare_data(recipe, load_tokenizer(recipe.model)).train["input_ids"]
    index = {tuple(ids): i for i, ids in enumerate(train)}
    assert len(index) == ROWS, "the training rows should all differ"

    drawn = []  # per rank: per step, the row numbers of its batch
    for rank in range(NPROC):
        path = job.recipe.parent / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} recorded no batch\n{job}"
        batches = json.loads(path.read_text())
        assert all(tuple(row) in index for batch in batches for row in batch), "a drawn row is not a training row"
        drawn.append([[index[tuple(row)] for row in batch] for batch in batches])

    for rank, batches in enumerate(drawn):
        assert [len(b) for b in batches] == [BATCH] * EPOCH_STEPS, f"rank {rank}: {batches}"
    for step in range(EPOCH_STEPS):
        rows = [set(drawn[rank][step]) for rank in range(NPROC)]
        assert not rows[0] & rows[1], f"step {step + 1}: both ranks trained on rows {sorted(rows[0] & rows[1])}"
    shards = [{i for batch in batches for i in batch} for batches in drawn]
    assert not shards[0] & shards[1]
    # One epoch of 3 steps x 2 ranks x 4 rows: together the ranks saw every row exactly once.
    assert sorted(i for batches in drawn for batch in batches for i in batch) == list(range(ROWS))


def test_ddp_adapter_loads_and_evaluates(jobs: dict[str, Job]):
    job = jobs["torchrun"]
    assert job.result.returncode == 0, str(job)
    model, tokenizer = load_tuned(job.run)
    # What rank 0 saved at the end is the state of the last checkpoint, and training moved it.
    from safetensors.torch import load_file

    final = load_file(job.run / "adapter" / "adapter_model.safetensors")
    last = load_file(job.run / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert any(k.endswith("lora_B.weight") and final[k].abs().max() > 0 for k in final)
    ids = tokenizer("Count: ab ab", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    report = evaluate(job.run, overrides=["eval.max_examples=2"])
    assert report.examples == 2
    assert math.isfinite(report.results["tuned"]["perplexity"])


def test_two_nodes_train_identical_replicas_equal_to_the_single_node_run(jobs: dict[str, Job]):
    from safetensors.torch import load_file

    nodes, single = jobs["nodes"], jobs["torchrun"]
    assert nodes.result.returncode == 0 and single.result.returncode == 0, f"{nodes}\n{single}"
    replicas = [load_file(nodes.recipe.parent / f"replica{rank}.safetensors") for rank in range(NPROC)]
    assert replicas[0] and replicas[0].keys() == replicas[1].keys()
    for name, weight in replicas[0].items():
        assert torch.equal(weight, replicas[1][name]), f"the ranks' replicas differ in {name}"
    # Two nodes of one process each are the same 2-rank job as one node of two: the same adapter, bit for bit.
    adapters = [load_file(job.run / "adapter" / "adapter_model.safetensors") for job in (nodes, single)]
    assert adapters[0].keys() == adapters[1].keys()
    for name, weight in adapters[0].items():
        assert torch.equal(weight, adapters[1][name]), f"the two-node adapter differs from one node's in {name}"
    assert any(w.abs().max() > 0 for n, w in adapters[0].items() if "lora_B" in n)
