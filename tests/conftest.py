"""Shared fixtures: small datasets and recipes on the in-process tiny model; each test marked by its folder.

Helpers that are not fixtures live in helpers.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import write_tiny_recipe

KINDS = ("unit", "integration", "e2e", "distributed")


def pytest_collection_modifyitems(config, items):
    """Mark every test with the folder it lives in: `pytest -m unit` runs tests/unit/, and so on. Tests marked
    `gpu` run where CUDA is (`pytest -m gpu` on a GPU machine) and are skipped elsewhere."""
    import torch

    tests = Path(__file__).resolve().parent
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        parts = Path(item.path).resolve().relative_to(tests).parts
        if len(parts) > 1 and parts[0] in KINDS:
            item.add_marker(getattr(pytest.mark, parts[0]))
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_gpu)


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
