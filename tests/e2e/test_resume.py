"""Runs that survive (issue 6): resume after a crash reproduces the uninterrupted run, atomic checkpoints, guards.

The end-to-end runs (SIGKILL and SIGINT through the real `python -m llmtune finetune`) start together in
one module fixture, so their interpreter start-ups overlap with the in-process reference runs; the checks
that need no subprocess are in tests/integration/test_resume_runs.py, the recipe-loader fuzz in
tests/unit/test_recipe_fuzz.py. Torch runs on one thread here and in the subprocesses: the tiny
model is far faster that way on a busy two-core machine, and both sides of every comparison use the same
thread count.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import RESUME_SAVE_STEPS as SAVE_STEPS
from helpers import RESUME_STEPS as STEPS
from helpers import RESUME_TRAINING as TRAINING
from helpers import (
    chat_rows,
    checkpoint_names,
    expect_error,
    fail_checkpoint_write,
    leftovers,
    log_entries,
    losses,
    manifest,
    run_dir,
    save_recipe,
    varied_rows,
    write_jsonl,
)
from safetensors.torch import load_file

from llmtune import artifacts
from llmtune.artifacts import COMPLETE_MARKER
from llmtune.run import finetune

KILL_AT = 4  # the signal goes out as soon as checkpoint-4 is complete: mid-epoch, 20 steps before the end
E2E_METHODS: dict[str, dict[str, Any]] = {
    "lora": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
    "full": {"name": "full"},
    "qlora": {"name": "qlora", "r": 4, "alpha": 8, "dropout": 0.1},
    "prompt": {"name": "prompt", "num_virtual_tokens": 4},
}
CLI_ENV = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
WEIGHT_FILES = {"adapter": "adapter_model.safetensors", "model": "model.safetensors"}

# The tiny models train much faster on one thread on a busy two-core machine.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_recipe(root: Path, name: str, method: dict[str, Any], **training: Any) -> Path:
    """A tiny:llama recipe over root/data with its run in root/runs/NAME."""
    if not (root / "data" / "train.jsonl").is_file():
        write_jsonl(root / "data" / "train.jsonl", varied_rows(40))
        write_jsonl(root / "data" / "eval.jsonl", chat_rows(6))
    recipe = {
        "model": "tiny:llama",
        "method": method,
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 128},
        "training": {**TRAINING, **training},
        "eval": {"max_new_tokens": 4, "batch_size": 6},
        "output": {"dir": str(root / "runs" / name)},
    }
    return save_recipe(root, name, recipe)


def weights(run: Path) -> dict[str, torch.Tensor]:
    for folder, name in WEIGHT_FILES.items():
        if (run / folder / name).is_file():
            return load_file(run / folder / name)
    raise AssertionError(f"{run}: no adapter/ or model/ weights")


def step_of(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.removeprefix(artifacts.CHECKPOINT_PREFIX))


def assert_same_weights(expected_run: Path, run: Path, tolerance: float = 1e-6) -> None:
    expected, got = weights(expected_run), weights(run)
    assert got.keys() == expected.keys()
    diff = max((got[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert diff <= tolerance, f"max |weight difference| {diff:.3g} between {expected_run.name} and {run.name}"


def assert_same_losses(expected_run: Path, run: Path, tolerance: float = 1e-6) -> None:
    expected, got = losses(expected_run), losses(run)
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))
    assert [s for s, _ in got] == list(range(1, STEPS + 1)), "every step logged exactly once, none skipped"
    worst = max(zip(expected, got, strict=True), key=lambda pair: abs(pair[0][1] - pair[1][1]))
    assert abs(worst[0][1] - worst[1][1]) <= tolerance, f"step {worst[0][0]}: loss {worst[1][1]} vs {worst[0][1]}"


@dataclass
class Cli:
    """`python -m llmtune ARGS` started in the background, its output going to files (progress bars are long)."""

    popen: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @classmethod
    def start(cls, root: Path, name: str, *args: str) -> Cli:
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        out, err = logs / f"{name}.out", logs / f"{name}.err"
        with out.open("w") as fo, err.open("w") as fe:
            popen = subprocess.Popen(
                [sys.executable, "-m", "llmtune", *args],
                cwd=root,
                env={**os.environ, **CLI_ENV},
                stdin=subprocess.DEVNULL,
                stdout=fo,
                stderr=fe,
            )
        return cls(popen, out, err)

    def wait(self, timeout: float = 400) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def describe(self) -> str:
        return f"exit {self.popen.returncode}\nstderr (tail):\n{self.stderr[-3000:]}"


# `python -S -c WATCHER PID MARKER SIGNAL`: poll for MARKER and signal PID the moment it exists. A process of its
# own, not a thread: a thread would wait for the GIL while this process trains its reference runs.
WATCHER = """
import os, sys, time
pid, marker, sig = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def alive():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True
deadline = time.monotonic() + 400  # a safety net against a hung run, not a timing assertion
while alive() and not os.path.isfile(marker) and time.monotonic() < deadline:
    time.sleep(0.001)
if alive() and os.path.isfile(marker):
    os.kill(pid, sig)
    print("sent", flush=True)
"""


def watch(cli: Cli, marker: Path, sig: int) -> subprocess.Popen:
    command = [sys.executable, "-S", "-c", WATCHER, str(cli.popen.pid), str(marker), str(int(sig))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)


@dataclass
class Stopped:
    """A run stopped by a signal, as it was left on disk right after the process ended."""

    recipe: Path
    run: Path
    cli: Cli
    signal_sent: bool = False
    returncode: int | None = None
    stderr: str = ""
    checkpoints: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)
    final_files: list[str] = field(default_factory=list)  # final weights / metrics present when it stopped
    incomplete_copy: Path | None = None
    resume_error: BaseException | None = None
    resume_cli: Cli | None = None

    def check_resumed(self) -> None:
        if self.resume_error is not None:
            raise self.resume_error
        if self.resume_cli is not None:
            assert self.resume_cli.popen.returncode == 0, self.resume_cli.describe()


@dataclass
class E2E:
    root: Path
    reference: dict[str, Path]  # method -> uninterrupted run directory (in-process)
    reference_errors: dict[str, BaseException]
    killed: dict[str, Stopped]  # method -> SIGKILL after checkpoint-4, then --resume
    interrupted: Stopped  # LoRA, SIGINT after checkpoint-4, then --resume-from the checkpoint it wrote

    def reference_run(self, method: str) -> Path:
        if method in self.reference_errors:
            raise self.reference_errors[method]
        return self.reference[method]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, one_torch_thread) -> E2E:
    root = tmp_path_factory.mktemp("resume")
    stopped: dict[str, Stopped] = {}
    for method, spec in E2E_METHODS.items():
        recipe = write_recipe(root, f"{method}-killed", spec)
        stopped[method] = Stopped(recipe, run_dir(recipe), Cli.start(root, f"{method}-killed", "finetune", recipe.name))
    recipe = write_recipe(root, "lora-sigint", E2E_METHODS["lora"])
    stopped["sigint"] = Stopped(recipe, run_dir(recipe), Cli.start(root, "lora-sigint", "finetune", recipe.name))
    watchers = []
    for name, s in stopped.items():
        sig = signal.SIGINT if name == "sigint" else signal.SIGKILL
        marker = s.run / f"{artifacts.CHECKPOINT_PREFIX}{KILL_AT}" / COMPLETE_MARKER
        watchers.append((s, watch(s.cli, marker, sig)))

    # The uninterrupted runs, in this process while the subprocesses start.
    reference, reference_errors = {}, {}
    for method, spec in E2E_METHODS.items():
        recipe = write_recipe(root, f"{method}-reference", spec)
        try:
            reference[method] = finetune(recipe).run.path
        except Exception as e:  # reported by the tests of that method only
            reference_errors[method] = e

    for s, watcher in watchers:
        s.returncode = s.cli.wait()
        s.signal_sent = "sent" in watcher.communicate(timeout=60)[0]
        s.stderr = s.cli.stderr
        s.checkpoints = checkpoint_names(s.run) if s.run.is_dir() else []
        s.manifest = manifest(s.run) if (s.run / artifacts.MANIFEST_FILE).is_file() else {}
        finals = (artifacts.ADAPTER_DIR, artifacts.MODEL_DIR, artifacts.METRICS_FILE)
        s.final_files = [name for name in finals if (s.run / name).exists()]

    # Resume: through the CLI for LoRA (--resume) and the SIGINT run (--resume-from), in-process for the rest.
    lora = stopped["lora"]
    if lora.run.is_dir():
        lora.incomplete_copy = root / "runs" / "lora-incomplete"
        shutil.copytree(lora.run, lora.incomplete_copy)
    for name, s in stopped.items():
        if not (s.signal_sent and s.checkpoints):
            s.resume_error = AssertionError(f"{name}: not stopped after a checkpoint\n{s.cli.describe()}")
    if lora.resume_error is None:
        lora.resume_cli = Cli.start(root, "lora-resume", "finetune", lora.recipe.name, "--resume")
    sigint = stopped.pop("sigint")
    if sigint.resume_error is None:
        checkpoint = f"runs/{sigint.run.name}/{sigint.checkpoints[-1]}"
        sigint.resume_cli = Cli.start(
            root, "sigint-resume", "finetune", sigint.recipe.name, "--resume-from", checkpoint
        )
    for method, s in stopped.items():
        if method != "lora" and s.resume_error is None:
            try:
                finetune(s.recipe, resume=True)
            except Exception as e:
                s.resume_error = e
    for s in (lora, sigint):
        if s.resume_cli is not None:
            s.resume_cli.wait()
    return E2E(root, reference, reference_errors, stopped, sigint)


# --- 1. SIGKILL mid-run, then --resume ----------------------------------------------------------------


@pytest.mark.parametrize("method", list(E2E_METHODS))
def test_sigkill_after_a_checkpoint_then_resume_reproduces_the_uninterrupted_run(e2e: E2E, method: str):
    killed = e2e.killed[method]
    assert killed.signal_sent, f"the run ended before checkpoint-{KILL_AT} was complete\n{killed.cli.describe()}"
    assert killed.returncode == -signal.SIGKILL
    # Killed mid-run: nothing final was written and the manifest still says running.
    assert killed.manifest["status"] == "running"
    assert killed.checkpoints and step_of(killed.checkpoints[-1]) < STEPS
    assert killed.final_files == []
    killed.check_resumed()
    reference = e2e.reference_run(method)
    m = manifest(killed.run)
    assert m["status"] == "completed"
    assert m["resumed_from"] == killed.checkpoints[-1]
    assert_same_weights(reference, killed.run)
    assert_same_losses(reference, killed.run)


def test_killed_run_leaves_only_complete_checkpoints_and_no_final_weights(e2e: E2E):
    killed = e2e.killed["lora"]
    copy = killed.incomplete_copy
    assert copy is not None and killed.signal_sent
    assert not (copy / artifacts.ADAPTER_DIR).exists() and not (copy / artifacts.METRICS_FILE).exists()
    # A kill between writes leaves no partial checkpoint under its final name (a kill inside a write may leave a
    # hidden staging directory, never a checkpoint-N without COMPLETE).
    assert not [n for n in leftovers(copy) if not n.startswith(".")]
    assert checkpoint_names(copy) == killed.checkpoints


# --- 2. SIGINT: checkpoint, exit 130 with a resume hint, --resume-from -------------------------------------


def test_sigint_checkpoints_exits_130_and_resume_reproduces_the_uninterrupted_run(e2e: E2E):
    s = e2e.interrupted
    assert s.signal_sent, s.cli.describe()
    assert s.returncode == 130, s.cli.describe()
    last = s.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "--resume" in last and "Traceback" not in s.stderr, last
    stopped_at = int(last.split("stopped after step ")[1].split()[0])
    assert KILL_AT <= stopped_at < STEPS
    # The step it stopped at has a complete checkpoint, and it is the newest one.
    assert s.checkpoints[-1] == f"checkpoint-{stopped_at}"
    assert s.manifest["status"] == "interrupted"
    s.check_resumed()
    reference = e2e.reference_run("lora")
    m = manifest(s.run)
    assert m["status"] == "completed" and m["resumed_from"] == f"checkpoint-{stopped_at}"
    assert_same_weights(reference, s.run)
    assert_same_losses(reference, s.run)


def test_resumed_log_has_one_training_summary(e2e: E2E):
    """The stopped run logged its own end-of-training summary at the step it stopped; resume must not keep it."""
    s = e2e.interrupted
    s.check_resumed()
    summaries = [e["step"] for e in log_entries(s.run) if "train_runtime" in e]
    assert summaries == [STEPS]


def test_resumed_metrics_report_the_whole_runs_mean_loss(e2e: E2E):
    killed = e2e.killed["lora"]
    killed.check_resumed()
    reference = json.loads((e2e.reference_run("lora") / artifacts.METRICS_FILE).read_text())
    resumed = json.loads((killed.run / artifacts.METRICS_FILE).read_text())
    assert resumed["steps"] == reference["steps"] == STEPS
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], abs=1e-6)


@dataclass
class WriteFailure:
    recipe: Path
    run: Path
    error: BaseException


@pytest.fixture(scope="module")
def write_failure(e2e: E2E) -> WriteFailure:
    """The LoRA end-to-end recipe, failing with EIO while writing checkpoint-8."""
    recipe = write_recipe(e2e.root, "lora-write-failure", E2E_METHODS["lora"])
    with pytest.MonkeyPatch.context() as mp:
        fail_checkpoint_write(mp, 2, OSError(errno.EIO, "Input/output error"))
        with pytest.raises(OSError) as info:
            finetune(recipe)
    return WriteFailure(recipe, run_dir(recipe), info.value)


def test_failed_checkpoint_write_leaves_the_previous_checkpoint_loadable(write_failure: WriteFailure, tmp_path):
    from llmtune.evaluation import evaluate
    from llmtune.models import load_tuned

    run = write_failure.run
    assert write_failure.error.errno == errno.EIO
    assert manifest(run)["status"] == "failed"
    assert leftovers(run) == [], "no half-written checkpoint and no staging directory left behind"
    assert checkpoint_names(run) == ["checkpoint-4"]
    checkpoint = run / "checkpoint-4"
    model, _ = load_tuned(checkpoint)
    saved = load_file(checkpoint / WEIGHT_FILES["adapter"])
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(state) == len(saved) > 0
    report = evaluate(checkpoint, out=tmp_path / "eval.json")
    assert report.examples == 6 and math.isfinite(report.results["tuned"]["loss"])


@pytest.fixture(scope="module")
def write_failure_resumed(write_failure: WriteFailure) -> WriteFailure:
    # A SIGKILL inside a checkpoint write would leave its staging directory behind: plant one.
    stale = write_failure.run / ".checkpoint-8.killed"
    shutil.copytree(write_failure.run / "checkpoint-4", stale)
    (stale / COMPLETE_MARKER).unlink()
    finetune(write_failure.recipe, resume=True)
    return write_failure


def test_resume_after_a_failed_checkpoint_write_reproduces_the_uninterrupted_run(
    write_failure_resumed: WriteFailure, e2e: E2E
):
    run = write_failure_resumed.run
    m = manifest(run)
    assert m["status"] == "completed" and m["resumed_from"] == "checkpoint-4"
    assert_same_weights(e2e.reference_run("lora"), run)
    assert_same_losses(e2e.reference_run("lora"), run)
    assert checkpoint_names(run) == [f"checkpoint-{STEPS - SAVE_STEPS}", f"checkpoint-{STEPS}"]


def test_resume_cleans_staging_directories_left_by_a_kill(write_failure_resumed: WriteFailure):
    assert leftovers(write_failure_resumed.run) == []


# --- 5. rotation ----------------------------------------------------------------------------------------


def test_keep_checkpoints_leaves_the_two_newest(e2e: E2E):
    run = e2e.reference_run("lora")
    assert checkpoint_names(run) == [f"checkpoint-{STEPS - SAVE_STEPS}", f"checkpoint-{STEPS}"]
    assert leftovers(run) == []
    assert all((run / name / artifacts.RECIPE_FILE).is_file() for name in checkpoint_names(run))


# --- 7. eval and merge-adapter on an incomplete run --------------------------------------------------------


def test_eval_and_merge_refuse_an_incomplete_run_but_accept_its_checkpoint(e2e: E2E, tmp_path):
    from llmtune.evaluation import evaluate
    from llmtune.merge import merge_adapter

    killed = e2e.killed["lora"]
    run = killed.incomplete_copy
    assert run is not None and killed.checkpoints
    checkpoint = run / killed.checkpoints[-1]
    with expect_error(str(run), "did not complete", "status: running", "--resume", str(checkpoint)):
        evaluate(run)
    with expect_error(str(run), "did not complete", str(checkpoint)):
        merge_adapter(run, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    report = evaluate(checkpoint, out=tmp_path / "eval.json")
    assert report.examples == 6 and math.isfinite(report.results["tuned"]["loss"])
    merged = merge_adapter(checkpoint, tmp_path / "merged")
    assert merged.max_abs_diff <= 1e-3 and (tmp_path / "merged" / "config.json").is_file()


# --- 8. reproducibility ------------------------------------------------------------------------------------


def test_same_recipe_and_seed_give_the_same_losses_and_weights(e2e: E2E, tmp_path):
    reference = e2e.reference_run("lora")
    again = finetune(e2e.root / "lora-reference.yaml", [f"output.dir={tmp_path / 'again'}"]).run.path
    assert_same_losses(reference, again)
    assert_same_weights(reference, again)
