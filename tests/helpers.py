"""Helpers shared by the tests: data rows, recipe writers, error checks, the CLI and its output, ports.

Import them with `from helpers import ...` (pyproject's pytest `pythonpath` puts tests/ on sys.path).
Fixtures live in conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmtune.errors import LLMTuneError

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
RECIPES = REPO / "recipes"
# Number words: chat_rows' answers, and the completions of the grpo and preference rows.
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
METRIC_KEYS = {"perplexity", "loss", "bleu", "rouge1", "rouge2", "rougeL", "exact_match"}


# --- data and recipes ------------------------------------------------------------------------------


def chat_rows(n: int) -> list[dict[str, Any]]:
    """Short, varied conversations: the answer is the word count of the question, in words."""
    words = WORDS
    rows = []
    for i in range(n):
        question = " ".join(["ab"] * (i % 7 + 1))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Count: {question}"},
                    {"role": "assistant", "content": words[i % 7 + 1]},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@contextlib.contextmanager
def expect_error(*fragments: str):
    """Expect an LLMTuneError whose message is one line containing every fragment."""
    with pytest.raises(LLMTuneError) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def write_tiny_recipe(root: Path, name: str = "tiny", rows: int = 24, **sections: Any) -> Path:
    """Write a recipe for tiny:llama with its own chat data under `root`; keyword sections replace the defaults."""
    write_jsonl(root / "data" / "train.jsonl", chat_rows(rows))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(6))
    recipe: dict[str, Any] = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
        # lr 1e-2 so three steps move LoRA's B well away from zero: a zero B makes merge checks pass trivially.
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "logging_steps": 1},
        "eval": {"max_new_tokens": 6, "batch_size": 4},
        "output": {"dir": str(root / "runs" / name)},
        **sections,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- the CLI ----------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m llmtune ARGS` exactly as a user runs it; never touches the hub."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llmtune", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, and one line `error: ...` on stderr holding every fragment; returns that line."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and lines[0].removeprefix("error:").strip(), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --- models ---------------------------------------------------------------------------------------


def probe_batch(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eval-mode logits of the real tokens (prompt tuning's virtual-token positions dropped, padding zeroed)."""
    was_training = model.training
    model.eval()
    # Where the model is (a trained one stays on the GPU of a GPU machine).
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, -batch["input_ids"].size(1) :].float()
    model.train(was_training)
    return logits.cpu() * batch["attention_mask"][..., None]


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
