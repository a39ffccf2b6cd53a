"""Bad input through the real CLI (`python -m llmtune`): exit code 2 and one line naming what is wrong.

Each case builds its bad input in a fresh tmp_path and says which command a user would hit it with and
which substrings the one line must contain. Recipe-only mistakes are caught before any model is loaded,
and `validate` (which runs the same recipe and data checks as `finetune`, without importing torch) reports
them in a fraction of the time; `finetune` is used for the cases only it reaches (model loading, the run
directory) and for one recipe mistake, to show its path turns errors into one line too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from helpers import assert_one_line_error

CLOSED_PORT_ENDPOINT = "http://127.0.0.1:9"  # nothing listens on the discard port: the hub is unreachable
HUB_MODEL = "some-org/some-model-that-does-not-exist"
HUB_DATASET = "some-org/some-dataset-that-does-not-exist"


@dataclass
class Case:
    args: list[str]
    expect: list[str]  # substrings of the one error line
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[], None] | None = None  # what must still hold after the command failed


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    # Never reach the real hub, even where the network allows it; cases may instead set HF_HUB_OFFLINE.
    full_env["HF_ENDPOINT"] = CLOSED_PORT_ENDPOINT
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "llmtune", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=120
    )


def edit_recipe(path: Path, edit: Callable[[dict], None]) -> Path:
    recipe = yaml.safe_load(path.read_text())
    edit(recipe)
    path.write_text(yaml.safe_dump(recipe))
    return path


def write_train_rows(tmp_path: Path, rows: list[dict]) -> None:
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_run_dir(tmp_path: Path, recipe: Path, status: str) -> Path:
    """A run directory as a crashed finetune leaves it: the resolved recipe and a manifest, no weights."""
    run = tmp_path / "runs" / "crashed"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(recipe.read_text())
    (run / "manifest.json").write_text(json.dumps({"status": status}))
    return run


# --- the cases ---------------------------------------------------------------------------------------


def unknown_key(tmp_path, make_recipe):
    recipe = make_recipe(method={"name": "lora", "rnak": 8})
    return Case(["finetune", str(recipe)], [str(recipe), "method.rnak", "did you mean 'r'"])


def wrong_type(tmp_path, make_recipe):
    recipe = make_recipe()
    edit_recipe(recipe, lambda r: r["training"].update(max_steps="many"))
    return Case(["validate", str(recipe)], [str(recipe), "training.max_steps", "'many'"])


def wrong_type_from_override(tmp_path, make_recipe):
    recipe = make_recipe()
    return Case(["validate", str(recipe), "--set", "training.batch_size=big"], [str(recipe), "training.batch_size"])


def missing_recipe_file(tmp_path, make_recipe):
    return Case(["validate", str(tmp_path / "nope.yaml")], [str(tmp_path / "nope.yaml"), "not found"])


def missing_data_file(tmp_path, make_recipe):
    recipe = make_recipe()
    edit_recipe(recipe, lambda r: r["data"].update(train="data/missing.jsonl"))
    return Case(["validate", str(recipe)], ["missing.jsonl", "data.train", "not found"])


def missing_column(tmp_path, make_recipe):
    recipe = make_recipe()
    write_train_rows(tmp_path, [{"text": "no messages here"}] * 3)
    return Case(["validate", str(recipe)], ["train.jsonl", "'messages'", "text"])


def empty_dataset(tmp_path, make_recipe):
    recipe = make_recipe()
    write_train_rows(tmp_path, [])
    return Case(["validate", str(recipe)], ["train.jsonl", "empty"])


def row_without_response(tmp_path, make_recipe):
    recipe = make_recipe()
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    write_train_rows(tmp_path, [good, good, {"messages": [{"role": "user", "content": "no answer"}]}])
    return Case(["validate", str(recipe)], ["train.jsonl", "row 3", "assistant"])


def existing_run_directory(tmp_path, make_recipe):
    recipe = make_recipe(name="occupied")
    run = tmp_path / "runs" / "occupied"
    run.mkdir(parents=True)
    (run / "keep.txt").write_text("mine")

    def left_alone() -> None:
        assert [p.name for p in run.iterdir()] == ["keep.txt"] and (run / "keep.txt").read_text() == "mine"

    return Case(["finetune", str(recipe)], [str(run), "--overwrite"], check=left_alone)


def unreachable_hub_model(tmp_path, make_recipe):
    # No HF_HUB_OFFLINE: the reachability probe itself has to notice the closed endpoint.
    recipe = make_recipe(model=HUB_MODEL)
    return Case(["finetune", str(recipe)], [HUB_MODEL, "could not reach the Hugging Face Hub", "tiny:llama"])


def offline_hub_model(tmp_path, make_recipe):
    case = unreachable_hub_model(tmp_path, make_recipe)
    case.env = {"HF_HUB_OFFLINE": "1"}
    return case


def unreachable_hub_dataset(tmp_path, make_recipe):
    recipe = make_recipe()
    edit_recipe(recipe, lambda r: r["data"].update(train=HUB_DATASET))
    return Case(["validate", str(recipe)], [HUB_DATASET, "could not be reached"])


def eval_not_a_run(tmp_path, make_recipe):
    stray = tmp_path / "not-a-run"
    stray.mkdir()
    (stray / "metrics.json").write_text("{}")
    return Case(["eval", str(stray)], [str(stray)])


def eval_failed_run(tmp_path, make_recipe):
    run = fake_run_dir(tmp_path, make_recipe(), status="failed")
    return Case(["eval", str(run)], [str(run), "status: failed", "--resume"])


def merge_failed_run(tmp_path, make_recipe):
    run = fake_run_dir(tmp_path, make_recipe(), status="failed")
    return Case(["merge-adapter", str(run), "--out", str(tmp_path / "merged")], [str(run), "status: failed"])


CASES = [
    unknown_key,
    wrong_type,
    wrong_type_from_override,
    missing_recipe_file,
    missing_data_file,
    missing_column,
    empty_dataset,
    row_without_response,
    existing_run_directory,
    unreachable_hub_model,
    offline_hub_model,
    unreachable_hub_dataset,
    eval_not_a_run,
    eval_failed_run,
    merge_failed_run,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_is_one_line_and_exit_2(build, tmp_path, make_recipe):
    case = build(tmp_path, make_recipe)
    assert_one_line_error(run_cli(case.args, tmp_path, case.env), *case.expect)
    if case.check is not None:
        case.check()


def test_eval_on_a_directory_that_is_not_a_run_says_so(tmp_path, make_recipe):
    case = eval_not_a_run(tmp_path, make_recipe)
    assert_one_line_error(run_cli(case.args, tmp_path, case.env), *case.expect, "not a run directory")


def test_debug_shows_the_traceback(tmp_path, make_recipe):
    case = unknown_key(tmp_path, make_recipe)
    result = run_cli(["--debug", "validate", *case.args[1:]], tmp_path, case.env)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "LLMTuneError" in result.stderr
    assert "method.rnak" in result.stderr
