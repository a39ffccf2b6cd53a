"""`llmtune push` and `output.push_to_hub`: the exact files a run uploads, the checks made before any network, the
one-line failures, and what a (fake) Hub receives. Run directories are built by hand here, file by file, so each
test knows every file that must go up and every file that must stay local."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FakeHub, assert_one_line_error, expect_error, fake_hub, ok, run_cli, write_tiny_recipe

import llmtune.push
from llmtune import artifacts
from llmtune.push import files_to_push, push
from llmtune.recipe import load_recipe

TOKENIZER = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
RECORDS = ["README.md", "recipe.yaml", "metrics.json", "eval.json"]
# Written by a run but never uploaded: checkpoints, logs, reports, predictions, a staging leftover.
LOCAL_ONLY = [
    "checkpoint-3/COMPLETE",
    "checkpoint-3/recipe.yaml",
    "checkpoint-3/optimizer.pt",
    "checkpoint-3/adapter_model.safetensors",
    "trainer_log.jsonl",
    "tensorboard/events.out.tfevents.1",
    "report.md",
    "report.png",
    "speed.json",
    "eval_predictions.jsonl",
    ".adapter.x1y2/adapter_model.safetensors",
]


def _write(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each file holds its own name, so what the Hub receives can be traced to the file it came from.
    path.write_bytes(path.as_posix().encode())


def fake_run(root: Path, method: dict | None = None, weights: list[str] | None = None) -> Path:
    """A completed run directory as finetune leaves it, with every file in LOCAL_ONLY beside the ones to upload."""
    recipe_path = write_tiny_recipe(root, method=method or {"name": "lora", "r": 4})
    recipe = load_recipe(recipe_path)
    run = artifacts.create_run_dir(root / "runs" / "tiny", recipe, overwrite=False)
    artifacts.update_manifest(run, status="completed")
    for name in [*(weights or []), *(f"tokenizer/{n}" for n in TOKENIZER), *RECORDS[2:], *LOCAL_ONLY]:
        _write(run.path / name)
    (run.path / "README.md").write_text("---\nlibrary_name: peft\n---\n# tiny\n")
    return run.path


LORA_WEIGHTS = ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/README.md"]
FULL_WEIGHTS = ["model/config.json", "model/generation_config.json", "model/model.safetensors"]


@pytest.fixture
def lora_run(tmp_path: Path) -> Path:
    return fake_run(tmp_path, weights=LORA_WEIGHTS)


def uploads(target: Path) -> dict[str, str]:
    """path in the repository -> local path relative to `target`."""
    return {name: local.relative_to(target).as_posix() for local, name in files_to_push(target)}


def test_lora_run_uploads_adapter_tokenizer_card_recipe_and_metrics(lora_run: Path):
    assert uploads(lora_run) == {
        "adapter_config.json": "adapter/adapter_config.json",
        "adapter_model.safetensors": "adapter/adapter_model.safetensors",
        **{name: f"tokenizer/{name}" for name in TOKENIZER},
        **{name: name for name in RECORDS},
    }


def test_full_run_uploads_its_model_weights(tmp_path: Path):
    run = fake_run(tmp_path, method={"name": "full"}, weights=FULL_WEIGHTS)
    assert uploads(run) == {
        **{Path(name).name: name for name in FULL_WEIGHTS},
        **{name: f"tokenizer/{name}" for name in TOKENIZER},
        **{name: name for name in RECORDS},
    }


def test_merged_directory_uploads_all_its_files(tmp_path: Path):
    merged = tmp_path / "merged"
    names = ["README.md", "config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    for name in [*names, "sub/extra.json", ".cache/huggingface/x.lock"]:
        _write(merged / name)
    assert uploads(merged) == {name: name for name in [*names, "sub/extra.json"]}


def test_unfinished_run_checkpoint_and_other_directories_are_refused(lora_run: Path, tmp_path: Path):
    with expect_error("training checkpoint", "push the completed run directory"):
        files_to_push(lora_run / "checkpoint-3")
    with expect_error("neither a run directory", "merge-adapter"):
        files_to_push(tmp_path / "data")
    artifacts.update_manifest(artifacts.RunDir(lora_run), status="failed")
    with expect_error("did not complete"):
        files_to_push(lora_run)


@pytest.fixture
def hub(monkeypatch) -> list[tuple[str, dict]]:
    return fake_hub(monkeypatch)


def test_fake_hub_receives_exactly_the_files_private_flag_and_model_type(lora_run: Path, hub):
    result = push(lora_run, "me/tiny-lora", private=True, token="hf_test")
    assert [name for name, _ in hub] == ["init", "create_repo", "create_commit"]
    assert hub[0][1] == {"token": "hf_test"}
    assert hub[1][1] == {"repo_id": "me/tiny-lora", "repo_type": "model", "private": True, "exist_ok": True}
    commit = hub[2][1]
    assert commit["repo_id"] == "me/tiny-lora" and commit["repo_type"] == "model"
    expected = {name: (lora_run / local).read_bytes() for name, local in uploads(lora_run).items()}
    assert commit["files"] == expected
    assert result.url == "https://hub.test/me/tiny-lora/commit/1"
    assert sorted(result.files) == sorted((name, len(data)) for name, data in expected.items())


def test_bad_repo_id_is_refused_before_any_network(lora_run: Path, hub):
    for bad, fragment in [("tiny-lora", "owner/name"), ("me/a/b", "owner/name"), ("me/bad name", "alphanumeric")]:
        with expect_error(repr(bad), "not a Hub repository id", fragment):
            push(lora_run, bad, token="hf_test")
    assert hub == []


def test_no_token_says_how_to_log_in(lora_run: Path, hub, monkeypatch):
    monkeypatch.setattr(llmtune.push, "get_token", lambda: None)
    with expect_error("me/x", "no Hugging Face token", "hf auth login", "HF_TOKEN"):
        push(lora_run, "me/x")
    assert hub == []


@pytest.mark.parametrize("status, fragment", [(401, "rejected the token"), (403, "may not write to me/x")])
def test_hub_refusals_are_one_line(lora_run: Path, hub, monkeypatch, status: int, fragment: str):
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils._http import httpx2

    def refuse(self, repo_id, **kwargs):
        request = httpx2.Request("POST", "https://hub.test/api/repos/create")
        raise HfHubHTTPError("refused\nmore lines", response=httpx2.Response(status, request=request))

    monkeypatch.setattr(FakeHub, "create_repo", refuse)
    with expect_error("push to me/x", fragment, f"({status})"):
        push(lora_run, "me/x", token="hf_test")


def test_merged_push_of_an_unmergeable_run_reuses_merge_adapters_refusal(tmp_path: Path, hub):
    run = fake_run(tmp_path, method={"name": "prompt"}, weights=LORA_WEIGHTS)
    with expect_error("nothing to merge", "llmtune generate", "push without --merged"):
        push(run, "me/x", merged=True, token="hf_test")
    assert hub == []


# --- the command line ------------------------------------------------------------------------------------


def test_dry_run_prints_each_file_and_its_size_without_a_token(lora_run: Path, tmp_path: Path):
    result = ok(run_cli("push", str(lora_run), "me/tiny-lora", "--dry-run", cwd=tmp_path, env={"HF_TOKEN": ""}))
    header, *rows = result.stdout.strip().splitlines()
    expected = uploads(lora_run)
    assert header.startswith(f"would upload {len(expected)} files (") and header.endswith("to me/tiny-lora:")
    printed = {name: int(size.replace(",", "")) for size, unit, name in (row.split() for row in rows)}
    assert printed == {name: (lora_run / local).stat().st_size for name, local in expected.items()}
    assert all(row.split()[1] == "bytes" for row in rows)


def test_cli_bad_repo_id_exits_2_with_one_line(lora_run: Path, tmp_path: Path):
    result = run_cli("push", str(lora_run), "tiny-lora", cwd=tmp_path)
    assert_one_line_error(result, "'tiny-lora'", "owner/name")


def test_cli_unreachable_hub_fails_with_one_line_naming_the_repo(lora_run: Path, tmp_path: Path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "0"}
    result = run_cli("push", str(lora_run), "me/tiny-lora", cwd=tmp_path, env=env)
    assert_one_line_error(result, "me/tiny-lora", "could not reach the Hugging Face Hub", "127.0.0.1:9")
    offline = run_cli("push", str(lora_run), "me/tiny-lora", cwd=tmp_path, env={"HF_TOKEN": "hf_test"})
    assert_one_line_error(offline, "me/tiny-lora", "HF_HUB_OFFLINE")


def test_cli_without_a_token_says_how_to_log_in(lora_run: Path, tmp_path: Path):
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf-home"), "HF_TOKEN_PATH": str(tmp_path / "no-token")}
    result = run_cli("push", str(lora_run), "me/tiny-lora", cwd=tmp_path, env=env)
    assert_one_line_error(result, "me/tiny-lora", "hf auth login")


# --- output.push_to_hub in a recipe ------------------------------------------------------------------------


def test_push_to_hub_defaults_and_round_trip(tmp_path: Path):
    recipe = load_recipe(write_tiny_recipe(tmp_path, output={"push_to_hub": {"repo_id": "me/tiny"}}))
    assert recipe.output.push_to_hub.model_dump() == {"repo_id": "me/tiny", "private": False, "merged": False}
    assert load_recipe(write_tiny_recipe(tmp_path)).output.push_to_hub is None


@pytest.mark.parametrize(
    "push_to_hub, method, fragments",
    [
        ({"repo_id": "tiny"}, "lora", ["output.push_to_hub.repo_id", "'tiny'", "owner/name"]),
        ({"repo_id": "me/x.git"}, "lora", ["output.push_to_hub.repo_id", ".git"]),
        ({"private": True}, "lora", ["output.push_to_hub.repo_id"]),
        ({"repo_id": "me/x", "merged": True}, "prompt", ["output.push_to_hub.merged", "nothing to merge", "false"]),
        ({"repo_id": "me/x", "merged": True}, "adapter", ["output.push_to_hub.merged", "bottleneck", "false"]),
    ],
)
def test_push_to_hub_is_checked_at_load(tmp_path: Path, push_to_hub: dict, method: str, fragments: list[str]):
    path = write_tiny_recipe(tmp_path, method={"name": method}, output={"push_to_hub": push_to_hub})
    with expect_error(*fragments):
        load_recipe(path)


@pytest.mark.parametrize("method", ["lora", "ia3", "full"])
def test_merged_push_is_accepted_where_there_is_a_standalone_model_to_upload(tmp_path: Path, method: str):
    path = write_tiny_recipe(
        tmp_path, method={"name": method}, output={"push_to_hub": {"repo_id": "me/x", "merged": True}}
    )
    assert load_recipe(path).output.push_to_hub.merged


@pytest.mark.parametrize(
    "model, named", [("HuggingFaceTB/SmolLM2-135M", True), ("tiny:llama", False), ("local", False)]
)
def test_model_card_names_a_base_model_only_when_it_is_a_hub_repository(tmp_path: Path, model: str, named: bool):
    from llmtune.report import model_card

    (tmp_path / "local").mkdir()
    recipe = load_recipe(write_tiny_recipe(tmp_path, model=model))
    # The Hub validates the card's metadata and refuses an upload whose base_model is not a model id.
    assert (f"base_model: {recipe.model}\n" in model_card(recipe, {}, {}, merged=False)) is named


def test_merged_push_checks_token_and_hub_before_merging(lora_run: Path, hub, monkeypatch):
    import llmtune.merge

    monkeypatch.setattr(llmtune.merge, "merge_adapter", lambda *a, **k: pytest.fail("merged before the checks"))
    monkeypatch.setattr(llmtune.push, "get_token", lambda: None)
    with expect_error("no Hugging Face token"):
        push(lora_run, "me/x", merged=True)
    monkeypatch.setattr(llmtune.push, "hub_reachable", lambda: False)
    with expect_error("me/x", "could not reach the Hugging Face Hub"):
        push(lora_run, "me/x", merged=True, token="hf_test")
    assert hub == []
