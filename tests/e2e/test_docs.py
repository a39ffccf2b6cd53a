"""The docs site builds without a warning, its generated reference covers the schema, and the README stays short.

The reference's expected keys are read from `Recipe.model_fields` here, not written down, so the test follows
the schema as it changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from llmtune.recipe import Recipe

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _sections() -> dict[str, list[type[BaseModel]]]:
    """Each top-level key whose value is a mapping, with the models it may hold (several for a union)."""
    found = {}
    for name, field in Recipe.model_fields.items():
        args = typing.get_args(field.annotation) or (field.annotation,)
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            found[name] = models
    return found


def test_reference_lists_the_schema_keys(site):
    page = (site / "reference" / "index.html").read_text(encoding="utf-8")
    sections = _sections()
    assert sections, "Recipe has no nested sections to check"
    expected = [name for name in Recipe.model_fields if name not in sections]
    for section, models in sections.items():
        # Every key of a one-model section; for a union (method, objective), every member's name and keys.
        for model in models:
            expected += [f"{section}.{key}" for key in model.model_fields if key != "name"]
            if "name" in model.model_fields:
                expected.append(typing.get_args(model.model_fields["name"].annotation)[0])
    # A key is a code cell in a table, a nested section a heading: both end up as >key< in the HTML.
    missing = [key for key in expected if f">{key}<" not in page]
    assert not missing, f"the reference lacks {missing[:10]}"


def _nav_files(entries) -> set[str]:
    files = set()
    for entry in entries:
        values = entry.values() if isinstance(entry, dict) else [entry]
        for value in values:
            files |= _nav_files(value) if isinstance(value, list) else {value}
    return files


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    docs = ROOT / config["docs_dir"]
    pages = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")}
    nav = _nav_files(config["nav"])
    assert pages - nav == set(), f"pages missing from the nav in mkdocs.yml: {sorted(pages - nav)}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; guides go to docs/, measurements to benchmarks/"
