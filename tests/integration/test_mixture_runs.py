"""A mixture trained on tiny:llama: each source counted at the start and in metrics.json, each one fingerprinted in
the manifest, so a resume after one source changed is refused naming that source, and accepted while none did."""

from __future__ import annotations

import json

import pytest
from helpers import chat_rows, expect_error, manifest, run_dir, tiny_training, varied_rows, write_jsonl

from llmtune import artifacts
from llmtune.run import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_mixture_run_counts_each_source_and_refuses_a_resume_after_one_changed(make_recipe, tmp_path, capsys):
    extra = write_jsonl(tmp_path / "data" / "extra.jsonl", varied_rows(16))
    sources = ["data/train.jsonl", {"path": "data/extra.jsonl", "count": 8}]
    recipe = make_recipe(
        data={"train": sources, "eval": "data/eval.jsonl", "max_length": 96},
        training=tiny_training(max_steps=2, save_steps=1),
    )
    finetune(recipe)
    run = run_dir(recipe)
    train = json.loads((run / artifacts.METRICS_FILE).read_text())["data"]["train"]
    assert list(train["sources"]) == ["data.train[0]", "data.train[1]"]
    assert [s["rows"] for s in train["sources"].values()] == [24, 8]
    for key in ("rows", "tokens", "loss_tokens", "truncated", "dropped"):
        assert train[key] == sum(s[key] for s in train["sources"].values()), key
    printed = capsys.readouterr().out
    assert f"data train: 32 rows, {train['tokens']:,} tokens" in printed
    assert f"  data.train[1] ({extra}): 8 rows, {train['sources']['data.train[1]']['tokens']:,} tokens" in printed
    fingerprints = manifest(run)["data_sources"]
    assert f"data.train[1] ({extra})" in fingerprints and len(fingerprints) == 3  # both sources and the held-out file

    # The same sources, drawn by the same seed, mix into the same rows again, so the run resumes.
    finetune(recipe, resume=run / "checkpoint-1")
    assert manifest(run)["status"] == "completed" and manifest(run)["resumed_from"] == "checkpoint-1"

    write_jsonl(extra, chat_rows(16))
    with expect_error(f"the rows of data.train[1] ({extra}) changed since the run started", "--overwrite") as info:
        finetune(recipe, resume=True)
    assert "data.train[0]" not in str(info.value)
    assert manifest(run)["data_sources"] == fingerprints
