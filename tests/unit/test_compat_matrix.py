"""The compatibility matrix as data (tests/compat_matrix.py): valid cells, the registry, the script and README."""

from __future__ import annotations

import subprocess
import sys

from compat_matrix import FEATURES, MATRIX, NA, REFUSED, STATUSES, TESTED, render
from helpers import ADAPTER_METHODS, TESTS, UNMERGEABLE_METHODS

from llmtune.methods import METHODS

# --- the matrix itself -----------------------------------------------------------------------------


README = TESTS.parent / "README.md"
START, END = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"


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
