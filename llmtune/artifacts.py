"""The run directory: its layout, atomic writes, and the manifest that tells a finished run from a crashed one.

RUN/
  recipe.yaml            the resolved recipe: eval, merge-adapter and generate need nothing else
  manifest.json          status (running / completed / failed), times, library versions
  adapter/               peft adapter (safetensors) for adapter methods, or
  model/                 the whole tuned model for methods that change base weights
  tokenizer/             tokenizer with the chat template used in training
  metrics.json           training metrics, parameter counts, data report
  trainer_log.jsonl      one line per logging step
  eval.json, eval_predictions.jsonl   written by `llmtune eval`
  harness.json           lm-evaluation-harness results, written by `llmtune eval --harness`
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from llmtune.errors import LLMTuneError
from llmtune.recipe import Recipe, dump_recipe, load_recipe

RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.json"
TRAINER_LOG_FILE = "trainer_log.jsonl"
EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "eval_predictions.jsonl"
HARNESS_FILE = "harness.json"
SPEED_FILE = "speed.json"  # the speed plan the run trained with


CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"


@dataclass(frozen=True)
class RunDir:
    """A run directory, or one of its checkpoints (which hold weights and tokenizer at their top level)."""

    path: Path

    @property
    def is_checkpoint(self) -> bool:
        return (self.path / COMPLETE_MARKER).is_file()

    @property
    def adapter(self) -> Path:
        if self.is_checkpoint and (self.path / "adapter_config.json").is_file():
            return self.path
        return self.path / ADAPTER_DIR

    @property
    def model(self) -> Path:
        return self.path if self.is_checkpoint else self.path / MODEL_DIR

    @property
    def tokenizer(self) -> Path:
        return self.path if self.is_checkpoint else self.path / TOKENIZER_DIR

    def file(self, name: str) -> Path:
        return self.path / name

    def recipe(self) -> Recipe:
        return load_recipe(self.path / RECIPE_FILE)

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            return {}


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    found = []
    for path in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / RECIPE_FILE).is_file()


def check_run_dir_free(path: Path, overwrite: bool) -> bool:
    """Whether `path` holds something that --overwrite allows replacing; raise if it does and that is not allowed."""
    occupied = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if occupied and not overwrite:
        raise LLMTuneError(
            f"{path}: run directory already exists and is not empty; pass --overwrite to replace it, "
            "or choose another with --set output.dir=..."
        )
    return occupied


def create_run_dir(path: Path, recipe: Recipe, overwrite: bool, **facts: Any) -> RunDir:
    """Make an empty run directory holding the resolved recipe and a 'running' manifest."""
    if check_run_dir_free(path, overwrite):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    write_text(path / RECIPE_FILE, dump_recipe(recipe))
    run = RunDir(path)
    manifest = {"status": "running", "started": now(), "versions": library_versions(), **facts}
    write_json(path / MANIFEST_FILE, manifest)
    return run


def update_manifest(run: RunDir, **fields: Any) -> None:
    manifest = run.manifest()
    manifest.update(fields)
    write_json(run.file(MANIFEST_FILE), manifest)


def open_run(path: Path) -> RunDir:
    """A completed run directory, or a one-line error saying what is wrong with it."""
    if not is_run_dir(path):
        raise LLMTuneError(f"{path}: not a run directory (no {RECIPE_FILE}); give a run directory or a recipe")
    run = RunDir(path)
    if run.is_checkpoint:
        return run
    status = run.manifest().get("status")
    if status != "completed":
        checkpoints = complete_checkpoints(path)
        hint = f"; or point at a checkpoint, e.g. {checkpoints[-1]}" if checkpoints else ""
        raise LLMTuneError(
            f"{path}: the run did not complete (status: {status or 'unknown'}); resume it with finetune --resume{hint}"
        )
    return run


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("llmtune", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash leaves the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(directory: Path) -> None:
    """Give a directory made by mkdtemp (0700) and its files the permissions plain mkdir/open would."""
    mask = _umask()
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `final` and move it into place only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield staging
        make_readable(staging)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
