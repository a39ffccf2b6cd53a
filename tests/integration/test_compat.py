"""The compatibility matrix (issue 3): every cell of tests/compat_matrix.py proved on a tiny model.

- "tested" cells train that combination for 2 steps through `llmtune.run.finetune` in-process (tiny:gpt2 for
  bitfit and head, tiny:llama otherwise) and check that every trainable tensor moved, plus what the feature
  promises (checkpointing switched on, rows packed, a 4-bit base, a merge that reproduces the logits).
  "distributed" cells: one torchrun job (2 CPU processes, gloo DDP) trains every method in turn, so the
  interpreter start-up is paid once; each rank reports a digest of its trainable weights, which must agree.
- "refused" cells: recipe validation (`load_recipe`) raises a one-line LLMTuneError, and `finetune` stops
  there before any tokenizer or model loads; merge refusals come from `merge_adapter` itself.
- "n/a" cells: QLoRA base: `bits` is refused as an option of qlora only; merge of a standalone model:
  `merge_adapter` says the run is already a standalone model.

Trained runs are shared through module-scoped fixtures (merge and QLoRA-base cells reuse the SFT run).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from compat_matrix import FEATURES, MATRIX, NA, REFUSED, STATUSES, TESTED, render
from helpers import TESTS, chat_rows, expect_error, free_port, write_jsonl

import llmtune.objectives
import llmtune.run
from llmtune import artifacts
from llmtune.merge import merge_adapter
from llmtune.methods import ADAPTER_METHODS, METHODS, UNMERGEABLE_METHODS
from llmtune.models import load_tuned
from llmtune.recipe import load_recipe
from llmtune.run import finetune

README = TESTS.parent / "README.md"
START, END = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"
STEPS = 2
ROWS = 24
NPROC = 2
# Methods that need a model with biases (bitfit) or a tied head (head) train tiny:gpt2.
GPT2_METHODS = {"bitfit", "head"}
# Recipe sections each feature changes (merge, QLoRA base and distributed reuse the SFT recipe).
FEATURE_SECTIONS: dict[str, dict[str, dict[str, Any]]] = {
    "sft": {},
    "grad_ckpt": {"training": {"gradient_checkpointing": True}},
    "packing": {"data": {"packing": True}},
    "padding_free": {"data": {"padding_free": True}},
}
FEATURE_KEYS = {
    "grad_ckpt": "training.gradient_checkpointing",
    "packing": "data.packing",
    "padding_free": "data.padding_free",
}
QUANTIZED_LAYERS = ("Linear4bit", "Linear8bitLt")

# The tiny models train much faster on one thread on a busy two-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def quantized_layers(model) -> int:
    """bitsandbytes' own quantized linear layers (peft's LoRA wrappers around them share their class names)."""
    return sum(
        type(m).__name__ in QUANTIZED_LAYERS and type(m).__module__.startswith("bitsandbytes") for m in model.modules()
    )


def cells(status: str) -> list[Any]:
    return [
        pytest.param(method, feature, id=f"{method}-{feature}")
        for method, row in MATRIX.items()
        for feature, (cell_status, _) in row.items()
        if cell_status == status
    ]


def model_of(method: str) -> str:
    return "tiny:gpt2" if method in GPT2_METHODS else "tiny:llama"


def write_recipe(root: Path, name: str, method: str, feature: str = "sft") -> Path:
    write_jsonl(root / "data" / "train.jsonl", chat_rows(ROWS))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(4))
    recipe: dict[str, Any] = {
        "model": model_of(method),
        "method": {"name": method},
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
        # lr 1e-2 so two steps move every trainable tensor (LoRA's A gets its first gradient in step 2).
        "training": {"max_steps": STEPS, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "logging_steps": 1},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "output": {"dir": str(root / "runs" / name)},
    }
    for section, values in FEATURE_SECTIONS.get(feature, {}).items():
        recipe[section] = {**recipe[section], **values}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def logged_loss_steps(run: Path) -> list[int]:
    lines = (run / artifacts.TRAINER_LOG_FILE).read_text().splitlines()
    return [entry["step"] for entry in map(json.loads, lines) if "loss" in entry]


def train_loss(run: Path) -> float:
    return json.loads((run / artifacts.METRICS_FILE).read_text())["train_loss"]


def check_run_directory(run: Path, method: str) -> None:
    """A completed run that saved what its method saves, with STEPS logged once each."""
    assert json.loads((run / artifacts.MANIFEST_FILE).read_text())["status"] == "completed"
    metrics = json.loads((run / artifacts.METRICS_FILE).read_text())
    assert metrics["steps"] == STEPS and math.isfinite(metrics["train_loss"])
    weights = run / ("adapter" if method in ADAPTER_METHODS else "model")
    assert any(weights.glob("*.safetensors")), sorted(p.name for p in run.iterdir())
    assert logged_loss_steps(run) == list(range(1, STEPS + 1))


# --- in-process runs -------------------------------------------------------------------------------


@dataclass
class Trained:
    method: str
    feature: str
    run: Path
    trainable: list[str]  # names of the parameters that required grad
    unmoved: list[str]  # of those, the ones training left exactly as they were
    gradient_checkpointing: bool  # some module had checkpointing switched on during training
    train_rows: int  # rows of the dataset the trainer drew batches from (fewer than ROWS once packed)
    flat_batches: bool  # the trainer's batches put rows end to end: one sequence, no attention mask
    quantized_layers: int  # bitsandbytes layers in the trained model


def _watch(build: Callable, seen: dict[str, Any]) -> Callable:
    """The sft trainer builder, with `train` wrapped to record what training did to the model."""

    def build_and_watch(recipe, model, *args, **kwargs):
        trainer = build(recipe, model, *args, **kwargs)
        train = trainer.train

        def watched_train(*a, **k):
            before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            result = train(*a, **k)
            after = dict(model.named_parameters())
            seen["trainable"] = sorted(before)
            seen["unmoved"] = sorted(n for n, p in before.items() if torch.equal(p, after[n].detach()))
            seen["gradient_checkpointing"] = any(
                getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
            )
            seen["train_rows"] = len(trainer.train_dataset)
            batch = next(iter(trainer.get_train_dataloader()))
            seen["flat_batches"] = "attention_mask" not in batch and batch["input_ids"].size(0) == 1
            seen["quantized_layers"] = quantized_layers(model)
            return result

        trainer.train = watched_train
        return trainer

    return build_and_watch


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Callable[[str, str], Trained]:
    """(method, feature) -> its finished 2-step run, trained on first use."""
    root = tmp_path_factory.mktemp("compat")
    cache: dict[tuple[str, str], Trained] = {}

    def get(method: str, feature: str = "sft") -> Trained:
        if (method, feature) not in cache:
            recipe = write_recipe(root, f"{method}-{feature}", method, feature)
            seen: dict[str, Any] = {}
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(llmtune.objectives.OBJECTIVES, "sft", _watch(llmtune.objectives.OBJECTIVES["sft"], seen))
                result = finetune(recipe)
            assert seen, "finetune never trained through the sft builder"
            cache[method, feature] = Trained(method, feature, result.run.path, **seen)
        return cache[method, feature]

    return get


def check_trained(t: Trained) -> None:
    check_run_directory(t.run, t.method)
    assert t.trainable, "nothing was trainable"
    assert not t.unmoved, f"trainable tensors that training left unchanged: {t.unmoved}"


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
build = llmtune.objectives.OBJECTIVES["sft"]
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


llmtune.objectives.OBJECTIVES["sft"] = watched
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
    runs = {m: write_recipe(root, m, m) for m in methods}
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


# --- the matrix itself -----------------------------------------------------------------------------


def test_matrix_has_a_valid_cell_for_every_method_and_feature():
    assert set(MATRIX) == set(METHODS), "one row per method of llmtune.methods.METHODS"
    for method, row in MATRIX.items():
        assert list(row) == list(FEATURES), method
        for feature, (status, note) in row.items():
            assert status in STATUSES, (method, feature, status)
            assert "\n" not in note and "|" not in note, (method, feature)
            if status != TESTED:
                assert note, f"{method} x {feature} is {status} and needs a note saying why"


def test_matrix_agrees_with_the_method_registry():
    for method, row in MATRIX.items():
        merge = TESTED if method in ADAPTER_METHODS - UNMERGEABLE_METHODS else REFUSED
        if method not in ADAPTER_METHODS:
            merge = NA
        assert row["merge"][0] == merge, method
        assert row["qlora_base"][0] == (TESTED if method == "qlora" else NA), method
        assert row["sft"][0] == TESTED, "SFT is the one objective: every method trains with it"


def test_script_prints_the_rendered_matrix():
    result = subprocess.run(
        [sys.executable, str(TESTS / "compat_matrix.py")], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == render()
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(MATRIX)
    assert all(line.count("|") == len(FEATURES) + 2 for line in table)


def test_readme_holds_the_rendered_matrix():
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, f"README.md needs one {START} ... {END} block"
    between = text.split(START, 1)[1].split(END, 1)[0]
    assert between.strip("\n") == render().strip("\n"), "paste the output of: python tests/compat_matrix.py"


# --- tested cells ----------------------------------------------------------------------------------


def prove_sft(trained, tmp_path: Path, method: str) -> None:
    t = trained(method)
    check_trained(t)
    assert not t.gradient_checkpointing and t.train_rows == ROWS
    model, _ = load_tuned(t.run)
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def prove_gradient_checkpointing(trained, tmp_path: Path, method: str) -> None:
    t = trained(method, "grad_ckpt")
    check_trained(t)
    assert t.gradient_checkpointing, "training.gradient_checkpointing was set but no module checkpointed"
    assert load_recipe(t.run / artifacts.RECIPE_FILE).training.gradient_checkpointing is True
    # Recomputing activations changes memory, not numbers: the same 2 steps give the same loss.
    plain = trained(method)
    assert train_loss(t.run) == pytest.approx(train_loss(plain.run), rel=1e-4)


def prove_packing(trained, tmp_path: Path, method: str) -> None:
    t = trained(method, "packing")
    check_trained(t)
    assert t.train_rows < ROWS, f"data.packing: the trainer still drew from {t.train_rows} unpacked rows"


def prove_padding_free(trained, tmp_path: Path, method: str) -> None:
    t = trained(method, "padding_free")
    check_trained(t)
    assert t.flat_batches, "data.padding_free: the trainer still padded its batches"
    # 'auto', the default, puts rows end to end too.
    assert trained(method).flat_batches


def prove_qlora_base(trained, tmp_path: Path, method: str) -> None:
    t = trained(method)
    check_trained(t)
    # Every linear layer of the blocks was quantized: 7 per block x 2 blocks of tiny:llama.
    assert t.quantized_layers == 14
    model, _ = load_tuned(t.run)
    assert quantized_layers(model) == 14


def prove_merge(trained, tmp_path: Path, method: str) -> None:
    t = trained(method)
    out = tmp_path / "merged"
    result = merge_adapter(t.run, out)
    assert result.max_abs_diff <= 1e-3 and result.reload_max_abs_diff <= 1e-3
    assert result.base_max_abs_diff > 0, "the merged model computes exactly what the base did"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert any(out.glob("*.safetensors"))


def prove_distributed(distributed: DistributedJob, method: str) -> None:
    reports = [rank.get(method) for rank in distributed.ranks]
    assert all(reports), f"{method}: no report from every rank\n{distributed.output_tail()}"
    for report in reports:
        assert report["world_size"] == NPROC
        assert report["trainable"] > 0 and not report["unmoved"], report
    assert reports[0]["digest"] == reports[1]["digest"], "the replicas' trainable weights differ after training"
    run = distributed.runs[method]
    check_run_directory(run, method)
    checkpoints = artifacts.complete_checkpoints(run)
    assert [c.name for c in checkpoints] == [f"checkpoint-{STEPS}"]
    for rank in range(NPROC):
        assert (checkpoints[0] / f"rng_state_{rank}.pth").is_file(), sorted(p.name for p in checkpoints[0].iterdir())


IN_PROCESS_PROOFS = {
    "sft": prove_sft,
    "grad_ckpt": prove_gradient_checkpointing,
    "packing": prove_packing,
    "padding_free": prove_padding_free,
    "qlora_base": prove_qlora_base,
    "merge": prove_merge,
}


@pytest.mark.parametrize(("method", "feature"), cells(TESTED))
def test_tested_cell(request, tmp_path: Path, method: str, feature: str):
    if feature == "distributed":
        prove_distributed(request.getfixturevalue("distributed"), method)
    else:
        assert feature in IN_PROCESS_PROOFS, f"no way to test {feature}; add a prove_* function"
        IN_PROCESS_PROOFS[feature](request.getfixturevalue("trained"), tmp_path, method)


def test_tiny_qlora_base_loads_once_the_process_group_is_up(distributed: DistributedJob):
    probes = [rank.get("_qlora_base_after_init") for rank in distributed.ranks]
    assert all(probes), distributed.output_tail()
    assert all(p["group_up"] for p in probes)
    assert [p["error"] for p in probes] == [None] * NPROC


# --- refused cells ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "feature"), cells(REFUSED))
def test_refused_cell(request, tmp_path: Path, monkeypatch, method: str, feature: str):
    if feature == "merge":
        t = request.getfixturevalue("trained")(method)
        with expect_error(str(t.run), "nothing to merge", "llmtune generate"):
            merge_adapter(t.run, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
        return
    assert feature in FEATURE_KEYS, f"no recipe setting for {feature}; add one to FEATURE_SECTIONS"
    path = write_recipe(tmp_path, "refused", method, feature)
    with expect_error(str(path), FEATURE_KEYS[feature], method):
        load_recipe(path)

    # And finetune stops there: no tokenizer or model is loaded, no run directory is written.
    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded a tokenizer or model for a refused recipe")

    monkeypatch.setattr(llmtune.run, "load_tokenizer", must_not_load)
    monkeypatch.setattr(llmtune.run, "load_base_model", must_not_load)
    with expect_error(FEATURE_KEYS[feature]):
        finetune(path)
    assert not (tmp_path / "runs").exists()


# --- n/a cells -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "feature"), cells(NA))
def test_not_applicable_cell(request, tmp_path: Path, method: str, feature: str):
    if feature == "qlora_base":
        # Nothing in a recipe of this method can ask for a quantized base: that option belongs to qlora.
        path = write_recipe(tmp_path, "quantized", method)
        recipe = yaml.safe_load(path.read_text())
        recipe["method"]["bits"] = 4
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        with expect_error("method.bits", "option of qlora", f"'{method}'"):
            load_recipe(path)
    elif feature == "merge":
        t = request.getfixturevalue("trained")(method)
        assert (t.run / "model" / "config.json").is_file() and not (t.run / "adapter").exists()
        with expect_error("already a standalone model", "no merge needed"):
            merge_adapter(t.run, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
    else:
        pytest.fail(f"{method} x {feature} is n/a, and nothing checks that; add a check here")
