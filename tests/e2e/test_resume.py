"""Runs that survive (issue 6): resume after a crash reproduces the uninterrupted run, atomic checkpoints, guards.

The end-to-end runs (SIGKILL and SIGINT through the real `python -m llmtune finetune`) start together in
one module fixture, so their interpreter start-ups overlap with the in-process reference runs; everything
else trains in-process on tiny:llama. Torch runs on one thread here and in the subprocesses: the tiny
model is far faster that way on a busy two-core machine, and both sides of every comparison use the same
thread count.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import chat_rows, expect_error, write_jsonl
from safetensors.torch import load_file

from llmtune import artifacts, methods
from llmtune.artifacts import COMPLETE_MARKER, complete_checkpoints
from llmtune.errors import LLMTuneError
from llmtune.recipe import Recipe, load_recipe
from llmtune.run import finetune
from llmtune.training import NonFiniteLoss, StopOnSignalCallback, StopRequested

try:
    import hypothesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # listed in the test extras; without it only the property tests are skipped
    hypothesis = None

STEPS = 24  # optimizer steps of the end-to-end runs: 40 rows / (4 x 2) = 5 steps an epoch, so 4.8 epochs
SAVE_STEPS = 4
KILL_AT = 4  # the signal goes out as soon as checkpoint-4 is complete: mid-epoch, 20 steps before the end
TRAINING = {
    "max_steps": STEPS,
    "batch_size": 4,
    "grad_accum": 2,
    "learning_rate": 1e-2,
    "seed": 0,
    "logging_steps": 1,
    "save_steps": SAVE_STEPS,
    "keep_checkpoints": 2,
}
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


# --- helpers ---------------------------------------------------------------------------------------


def varied_rows(n: int) -> list[dict[str, Any]]:
    """Conversations of very different lengths, in prompt and in answer (so in loss-bearing tokens)."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    rows = []
    for i in range(n):
        question = " ".join(["ab"] * (i * 7 % 23 + 1))
        answer = " ".join([words[i % 7 + 1]] * (i * 5 % 4 + 1))
        rows.append(
            {"messages": [{"role": "user", "content": f"Count: {question}"}, {"role": "assistant", "content": answer}]}
        )
    return rows


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
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def run_dir(recipe: Path) -> Path:
    return Path(yaml.safe_load(recipe.read_text())["output"]["dir"])


def manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / artifacts.MANIFEST_FILE).read_text())


def log_entries(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / artifacts.TRAINER_LOG_FILE).read_text().splitlines()]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in log_entries(run) if "loss" in e]


def weights(run: Path) -> dict[str, torch.Tensor]:
    for folder, name in WEIGHT_FILES.items():
        if (run / folder / name).is_file():
            return load_file(run / folder / name)
    raise AssertionError(f"{run}: no adapter/ or model/ weights")


def step_of(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.removeprefix(artifacts.CHECKPOINT_PREFIX))


def checkpoint_names(run: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(run)]


def leftovers(run: Path) -> list[str]:
    """Staging directories and checkpoint directories without COMPLETE: what an atomic writer never leaves."""
    names = []
    for p in run.iterdir():
        if p.name.startswith("." + artifacts.CHECKPOINT_PREFIX):
            names.append(p.name)
        elif p.name.startswith(artifacts.CHECKPOINT_PREFIX) and not (p / COMPLETE_MARKER).is_file():
            names.append(p.name)
    return sorted(names)


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


def assert_one_line(message: str) -> None:
    assert "\n" not in message and "\r" not in message, repr(message)


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


# --- 3. a failure in the middle of a checkpoint write ---------------------------------------------------


def fail_checkpoint_write(monkeypatch: pytest.MonkeyPatch, nth: int, error: BaseException) -> None:
    """Raise `error` from the `nth` checkpoint write, after weights and optimizer are written, before RNG states."""
    from transformers import Trainer

    original = Trainer._save_rng_state
    calls = {"n": 0}

    def save_rng_state(self, output_dir):
        calls["n"] += 1
        if calls["n"] == nth:
            raise error
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)


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


def test_disk_full_during_a_checkpoint_write_is_a_one_line_error(make_recipe, monkeypatch):
    recipe = make_recipe(training={**TRAINING, "max_steps": 4, "save_steps": 2, "grad_accum": 1})
    fail_checkpoint_write(monkeypatch, 2, OSError(errno.ENOSPC, "No space left on device"))
    with expect_error("disk full", "checkpoint-4", "earlier checkpoints are intact", "--resume"):
        finetune(recipe)
    run = run_dir(recipe)
    assert manifest(run)["status"] == "failed"
    assert checkpoint_names(run) == ["checkpoint-2"] and leftovers(run) == []


def test_disk_full_as_safetensors_reports_it_is_a_disk_full_error(make_recipe, monkeypatch):
    import peft.peft_model
    from safetensors import SafetensorError

    original = peft.peft_model.safe_save_file
    calls = {"n": 0}

    def save_file(*args, **kwargs):  # exactly what safetensors raises when the disk fills up (seen on a tmpfs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(*args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    recipe = make_recipe(training={**TRAINING, "max_steps": 4, "save_steps": 2, "grad_accum": 1})
    try:
        finetune(recipe)
        error = None
    except Exception as e:
        error = e
    if calls["n"] < 2:
        raise RuntimeError("the checkpoint's adapter was not written through peft.peft_model.safe_save_file")
    assert isinstance(error, LLMTuneError), f"{type(error).__name__}: {error}"
    assert_one_line(str(error))
    assert "disk full" in str(error) and "earlier checkpoints are intact" in str(error)
    assert checkpoint_names(run_dir(recipe)) == ["checkpoint-2"]


# --- 4. non-finite loss ----------------------------------------------------------------------------------


def poison_embeddings(monkeypatch: pytest.MonkeyPatch, method: str, first_bad_forward: int, value: float) -> None:
    """Build `method` as usual, then multiply the input embeddings by `value` from the Nth training forward on.

    (Not the logits: TRL computes the SFT loss from lm_head's weight directly, so lm_head's hooks never run.)
    """
    build = methods.METHODS[method]
    calls = {"n": 0}

    def build_poisoned(spec, model, tokenizer, **kwargs):
        tuned = build(spec, model, tokenizer, **kwargs)

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] >= first_bad_forward:
                    return output * value
            return None

        tuned.get_input_embeddings().register_forward_hook(hook)
        return tuned

    monkeypatch.setitem(methods.METHODS, method, build_poisoned)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(make_recipe, monkeypatch, value):
    recipe = make_recipe(training={**TRAINING, "max_steps": 8, "save_steps": 2, "grad_accum": 1})
    poison_embeddings(monkeypatch, "lora", first_bad_forward=5, value=value)
    run = run_dir(recipe)
    with pytest.raises(NonFiniteLoss) as info:
        finetune(recipe)
    message = str(info.value)
    assert_one_line(message)
    assert "step 5" in message and str(run / "checkpoint-4") in message, message
    assert checkpoint_names(run) == ["checkpoint-2", "checkpoint-4"] and leftovers(run) == []
    assert manifest(run)["status"] == "failed"
    assert max(s for s, _ in losses(run)) == 4


# --- SIGTERM in-process: the stop, and the resume hint --------------------------------------------------


def signal_at_forward(monkeypatch: pytest.MonkeyPatch, method: str, nth: int, sig: int) -> None:
    """Send `sig` to this process during the Nth training forward: only once finetune's handler is installed."""
    build = methods.METHODS[method]
    calls = {"n": 0}

    def build_signalling(spec, model, tokenizer, **kwargs):
        tuned = build(spec, model, tokenizer, **kwargs)

        def hook(module, args, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == nth:
                    handler = signal.getsignal(sig)
                    if not isinstance(getattr(handler, "__self__", None), StopOnSignalCallback):
                        raise RuntimeError(f"no llmtune handler for {sig!r}; not signalling the test process")
                    os.kill(os.getpid(), sig)
            return None

        tuned.get_input_embeddings().register_forward_hook(hook)
        return tuned

    monkeypatch.setitem(methods.METHODS, method, build_signalling)


def test_sigterm_finishes_the_step_checkpoints_and_restores_handlers(make_recipe, monkeypatch):
    recipe = make_recipe(training={**TRAINING, "max_steps": 8, "save_steps": None, "grad_accum": 1})
    signal_at_forward(monkeypatch, "lora", nth=3, sig=signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(StopRequested) as info:
        finetune(recipe)
    assert info.value.exit_code == 130
    assert_one_line(str(info.value))
    assert "SIGTERM" in str(info.value) and "--resume" in str(info.value)
    run = run_dir(recipe)
    assert checkpoint_names(run) == ["checkpoint-3"] and leftovers(run) == []
    assert manifest(run)["status"] == "interrupted"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_resume_hint_works_for_a_run_started_with_overrides(make_recipe, monkeypatch):
    recipe = make_recipe(training={**TRAINING, "max_steps": 6, "save_steps": None, "grad_accum": 1})
    signal_at_forward(monkeypatch, "lora", nth=2, sig=signal.SIGTERM)
    with pytest.raises(StopRequested) as info:
        finetune(recipe, ["training.learning_rate=0.02"])
    command = shlex.split(str(info.value).split("resume with: ", 1)[1])
    assert command[:2] == ["llmtune", "finetune"]
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--set"]
    finetune(command[2], overrides, resume=True)  # what the user runs next, as the message says


# --- 5. rotation ----------------------------------------------------------------------------------------


def test_keep_checkpoints_leaves_the_two_newest(e2e: E2E):
    run = e2e.reference_run("lora")
    assert checkpoint_names(run) == [f"checkpoint-{STEPS - SAVE_STEPS}", f"checkpoint-{STEPS}"]
    assert leftovers(run) == []
    assert all((run / name / artifacts.RECIPE_FILE).is_file() for name in checkpoint_names(run))


@pytest.mark.parametrize(
    ("save_steps", "keep", "expected"),
    [(None, 2, ["checkpoint-3"]), (1, None, ["checkpoint-1", "checkpoint-2", "checkpoint-3"])],
    ids=["save_steps-null", "keep-null"],
)
def test_checkpoint_schedule(make_recipe, save_steps, keep, expected):
    recipe = make_recipe(training={**TRAINING, "max_steps": 3, "save_steps": save_steps, "keep_checkpoints": keep})
    run = finetune(recipe).run.path
    assert checkpoint_names(run) == expected and leftovers(run) == []


# --- 6. resume errors ------------------------------------------------------------------------------------


@pytest.fixture
def short_run(make_recipe) -> Path:
    recipe = make_recipe(training={**TRAINING, "max_steps": 2, "save_steps": 1, "grad_accum": 1})
    finetune(recipe)
    return recipe


def test_resume_without_a_run_directory(make_recipe):
    recipe = make_recipe()
    with expect_error(str(run_dir(recipe)), "no run to resume", "without --resume"):
        finetune(recipe, resume=True)
    assert not run_dir(recipe).exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [("training.learning_rate=0.02", "training.learning_rate"), ("method.r=8", "method.r")],
)
def test_resume_with_a_changed_recipe_names_the_key(short_run: Path, override: str, key: str):
    before = manifest(run_dir(short_run))
    with expect_error("recipe changed", key, "--overwrite"):
        finetune(short_run, [override], resume=True)
    assert manifest(run_dir(short_run)) == before


def test_resume_from_a_directory_without_complete(short_run: Path):
    run = run_dir(short_run)
    partial = run / "checkpoint-1"
    (partial / COMPLETE_MARKER).unlink()
    with expect_error(str(partial), "not a complete checkpoint", COMPLETE_MARKER):
        finetune(short_run, resume=partial)
    for checkpoint in complete_checkpoints(run):
        (checkpoint / COMPLETE_MARKER).unlink()
    with expect_error("no complete checkpoint"):
        finetune(short_run, resume=True)


def test_resume_refuses_changed_training_data(short_run: Path):
    train = short_run.parent / "data" / "train.jsonl"
    write_jsonl(train, chat_rows(30)[5:])
    try:
        finetune(short_run, resume=True)
    except LLMTuneError as e:
        assert_one_line(str(e))
        assert "data" in str(e)
        return
    raise AssertionError("resumed a run whose training data changed since its checkpoint")


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


# --- 9. the loss is token-weighted across gradient accumulation --------------------------------------------


def one_step_gradients(recipe_path: Path, out: Path) -> dict[str, Any]:
    """Gradients of the first optimizer step (before it is taken), its logged loss, and the rows it saw."""
    from transformers import TrainerCallback, set_seed

    from llmtune.data import prepare_data
    from llmtune.models import load_model, load_tokenizer
    from llmtune.objectives import build_sft

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    set_seed(recipe.training.seed)
    model = methods.METHODS[recipe.method.name](recipe.method, load_model(recipe.model), tokenizer)
    with torch.no_grad():  # LoRA's B starts at zero, and so would every gradient of A
        generator = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    found: dict[str, Any] = {"rows": []}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            found["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                found["loss"] = logs["loss"]

    trainer = build_sft(recipe, model, tokenizer, data, out, callbacks=[Capture()])
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        if "cu_seq_lens_q" in inputs:  # padding-free: the batch's rows end to end in one sequence
            bounds = inputs["cu_seq_lens_q"].tolist()
            for s, e in pairwise(bounds):
                found["rows"].append((inputs["input_ids"][0, s:e].tolist(), inputs["labels"][0, s:e].tolist()))
        else:
            for ids, mask, labels in zip(inputs["input_ids"], inputs["attention_mask"], inputs["labels"], strict=True):
                found["rows"].append((ids[mask.bool()].tolist(), labels[mask.bool()].tolist()))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    found["model"] = model
    return found


def test_grad_accum_gives_the_same_token_weighted_loss_and_gradients(make_recipe, tmp_path):
    # float32 throughout: the comparison is at 1e-5, below bf16 autocast's rounding.
    common = {"max_steps": 1, "logging_steps": 1, "learning_rate": 1e-9, "max_grad_norm": 1e9, "seed": 3, "bf16": False}
    recipes = {
        "b8": make_recipe("b8", training={**common, "save_steps": None, "batch_size": 8, "grad_accum": 1}),
        "b2": make_recipe("b2", training={**common, "save_steps": None, "batch_size": 2, "grad_accum": 4}),
    }
    write_jsonl(tmp_path / "data" / "train.jsonl", varied_rows(24))  # 4 to 25 loss-bearing tokens a row
    big = one_step_gradients(recipes["b8"], tmp_path / "b8")
    small = one_step_gradients(recipes["b2"], tmp_path / "b2")
    assert len(big["rows"]) == len(small["rows"]) == 8
    assert sorted(map(str, big["rows"])) == sorted(map(str, small["rows"])), "both steps see the same 8 rows"

    # Per-row sums of the loss at the weights of that step, one row at a time without padding.
    model = big["model"]
    model.eval()
    sums: dict[str, tuple[float, int]] = {}
    with torch.no_grad():
        for ids, labels in big["rows"]:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            nll = torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            sums[str((ids, labels))] = (nll, int((target != -100).sum()))
    token_weighted = sum(n for n, _ in sums.values()) / sum(c for _, c in sums.values())
    # What a per-micro-batch mean averaged over the 4 micro-batches would give instead: the test must tell them apart.
    pairs = [[sums[str(row)] for row in small["rows"][i : i + 2]] for i in range(0, 8, 2)]
    naive = sum(sum(n for n, _ in pair) / sum(c for _, c in pair) for pair in pairs) / len(pairs)
    assert abs(naive - token_weighted) > 1e-3, "rows too alike to tell token weighting from batch averaging"
    assert big["loss"] == pytest.approx(token_weighted, abs=1e-5)
    assert small["loss"] == pytest.approx(token_weighted, abs=1e-5)

    assert big["grads"].keys() == small["grads"].keys()
    scale = max(g.abs().max().item() for g in big["grads"].values())
    assert scale > 1e-3
    diff = max((big["grads"][k] - small["grads"][k]).abs().max().item() for k in big["grads"])
    assert diff <= 1e-5, f"max |gradient difference| {diff:.3g} (largest gradient {scale:.3g})"


# --- 10. the recipe loader never answers with a traceback --------------------------------------------------

VALID_RECIPE: dict[str, Any] = {
    "model": "tiny:llama",
    "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
    "objective": {"name": "sft"},
    "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
    "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "save_steps": 2},
    "eval": {"max_new_tokens": 6, "batch_size": 4, "metrics": ["bleu"]},
    "output": {"dir": "runs/x"},
}


def load_outcome(path: Path) -> Recipe | LLMTuneError:
    """What load_recipe answers: a Recipe or a one-line LLMTuneError; anything else fails the test."""
    try:
        return load_recipe(path)
    except LLMTuneError as e:
        assert_one_line(str(e))
        assert str(e).strip(), "an empty message"
        return e


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    write_jsonl(root / "data" / "train.jsonl", chat_rows(4))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(2))
    return root


def test_valid_skeleton_loads(fuzz_dir: Path):
    path = fuzz_dir / "valid.yaml"
    path.write_text(yaml.safe_dump(VALID_RECIPE))
    assert isinstance(load_outcome(path), Recipe)


if hypothesis is not None:
    # The pathological inputs are covered case by case in test_recipe_loader_known_bad_documents; here:
    # no \n or \r in keys and paths, integers well under 4300 digits, nesting a few levels deep.
    _text = st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)), max_size=20)
    _keys = st.one_of(
        _text,
        st.sampled_from(
            sorted({k for v in VALID_RECIPE.values() if isinstance(v, dict) for k in v} | set(VALID_RECIPE))
            + ["name", "r", "bits", "num_virtual_tokens", "pattern", "last_k", "init", "init_text", "columns"]
        ),
        st.integers(-5, 5),
        st.booleans(),
        st.none(),
    )
    _scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(allow_nan=True, allow_infinity=True),
        _text,
        st.sampled_from(["lora", "qlora", "prompt", "layers", "full", "sft", "chat", "text", "all-linear", "nf4"]),
    )
    # Values of the right shape for many keys, so that mutated skeletons are often still valid recipes.
    _plausible = st.one_of(
        st.integers(1, 64),
        st.floats(0.001, 0.9),
        st.booleans(),
        st.none(),
        st.sampled_from(["all-linear", "response", "all", "truncate", "drop", "cosine", "float32", "chat", "text"]),
    )
    _values = st.recursive(
        _scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
        max_leaves=12,
    )

    def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
        found = [prefix] if prefix else []
        if isinstance(tree, dict):
            for key, value in tree.items():
                found += _paths(value, (*prefix, key))
        return found

    def _same_kind(value: Any) -> st.SearchStrategy:
        """A random value of the same type as `value`: keeps the recipe's shape, probes its ranges."""
        if isinstance(value, bool):
            return st.booleans()
        if isinstance(value, int):
            return st.one_of(st.integers(-3, 100), st.integers(min_value=-(10**400), max_value=10**400))
        if isinstance(value, float):
            return st.floats(allow_nan=True, allow_infinity=True)
        if isinstance(value, str):
            return st.one_of(_text, st.sampled_from(["lora", "prompt", "chat", "text", "all-linear", "sft", "x.jsonl"]))
        if isinstance(value, list):
            return st.lists(st.sampled_from(["bleu", "rouge", "perplexity", "exact_match", "accuracy"]), max_size=4)
        return _values

    @st.composite
    def _retyped_skeletons(draw) -> Any:
        recipe = json.loads(json.dumps(VALID_RECIPE))
        for path in draw(st.lists(st.sampled_from(_paths(recipe)), max_size=3, unique=True)):
            node = recipe
            for key in path[:-1]:
                node = node[key]
            if path[-1] in node and not isinstance(node[path[-1]], dict):
                node[path[-1]] = draw(_same_kind(node[path[-1]]))
        return recipe

    @st.composite
    def _mutated_skeletons(draw) -> Any:
        recipe = json.loads(json.dumps(VALID_RECIPE))
        for _ in range(draw(st.integers(1, 4))):
            path = draw(st.sampled_from(_paths(recipe)))
            node = recipe
            for key in path[:-1]:
                node = node[key]
            if not isinstance(node, dict) or path[-1] not in node:
                continue
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "replace":
                node[path[-1]] = draw(st.one_of(_plausible, _values))
            elif action == "delete":
                del node[path[-1]]
            else:
                node[draw(_keys)] = draw(_values)
        return recipe

    _documents = st.one_of(
        _values.map(lambda v: ("yaml", v)),
        _mutated_skeletons().map(lambda v: ("yaml", v)),
        _retyped_skeletons().map(lambda v: ("yaml", v)),
        _retyped_skeletons().map(lambda v: ("yaml", v)),
        _text.map(lambda t: ("text", t)),
        st.binary(max_size=200).map(lambda b: ("bytes", b)),
        st.just(("bytes", b"")),
        st.just(("bytes", b"\xff\xfe\x00m\x00o")),
        st.sampled_from(["---\n", "~\n", "[]\n", "''\n", "- model: x\n", "model: [\n", "\t", "a: b: c"]).map(
            lambda t: ("text", t)
        ),
    )

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(document=_documents, unicode=st.booleans())
    def _loader_property(fuzz_dir: Path, document: tuple[str, Any], unicode: bool) -> None:
        kind, value = document
        path = fuzz_dir / "fuzzed.yaml"
        if kind == "yaml":
            path.write_text(yaml.safe_dump(value, allow_unicode=unicode), encoding="utf-8")
        elif kind == "text":
            path.write_text(value, encoding="utf-8")
        else:
            path.write_bytes(value)
        outcome = load_outcome(path)
        hypothesis.event(f"{kind}: {'recipe' if isinstance(outcome, Recipe) else 'one-line error'}")

    def test_recipe_loader_answers_a_recipe_or_a_one_line_error(fuzz_dir: Path):
        _loader_property(fuzz_dir)

else:

    @pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[test]')")
    def test_recipe_loader_answers_a_recipe_or_a_one_line_error():
        pass


LOADER_BUGS = {
    "deep-flow-list": "[" * 3000 + "]" * 3000,
    "deep-block-mapping": "".join("  " * i + "a:\n" for i in range(1500)) + "  " * 1500 + "b: 1\n",
    "integer-over-4300-digits": "model: tiny:llama\nmethod: {name: lora, r: 1" + "0" * 5000 + "}\ndata: {train: x/y}\n",
    "newline-in-unknown-key": 'model: tiny:llama\nmethod: {name: lora}\ndata: {train: x/y}\ntraining: {"a\\nb": 1}\n',
    "newline-in-data-path": 'model: tiny:llama\nmethod: {name: lora}\ndata: {train: "a\\nb.jsonl"}\n',
    "data-path-too-long": "model: tiny:llama\nmethod: {name: lora}\ndata: {train: " + "a" * 300 + ".jsonl}\n",
    "model-name-too-long": "model: " + "m" * 300 + "\nmethod: {name: lora}\ndata: {train: x/y}\n",
    "deeply-nested-layers-pattern": "model: tiny:llama\nmethod: {name: layers, pattern: '"
    + "(" * 1200
    + ")" * 1200
    + "'}\ndata: {train: x/y}\n",
}


@pytest.mark.parametrize("text", list(LOADER_BUGS.values()), ids=list(LOADER_BUGS))
def test_recipe_loader_known_bad_documents(fuzz_dir: Path, text: str):
    path = fuzz_dir / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    load_outcome(path)
