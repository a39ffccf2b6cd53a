"""Shared fixtures: small datasets and recipes on the in-process tiny model."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmtune.errors import LLMTuneError


def chat_rows(n: int) -> list[dict[str, Any]]:
    """Short, varied conversations: the answer is the word count of the question, in words."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
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


@pytest.fixture
def make_recipe(tmp_path: Path):
    """`write_tiny_recipe` into this test's tmp_path."""

    def _make(name: str = "tiny", rows: int = 24, **sections: Any) -> Path:
        return write_tiny_recipe(tmp_path, name, rows, **sections)

    return _make


@pytest.fixture
def sft_trainers(monkeypatch) -> list:
    """Every trainer the sft objective builds while the test runs, in order."""
    import llmtune.objectives

    built = []

    def build(*args, real=llmtune.objectives.OBJECTIVES["sft"].build_trainer, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(llmtune.objectives.OBJECTIVES["sft"], "build_trainer", build)
    return built


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models train much faster on one thread on a busy two-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
