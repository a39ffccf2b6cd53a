"""GRPO end to end through the CLI: finetune, eval, merge-adapter."""

from __future__ import annotations

import json

from helpers import log_entries as read_log
from helpers import write_grpo_recipe
from typer.testing import CliRunner

from llmtune.cli.app import app


def test_grpo_e2e_finetune_eval_merge(tmp_path, one_torch_thread):
    path = write_grpo_recipe(tmp_path, objective={"reward": ["exact_match", "iso_date"], "reward_weights": [1, 0.5]})
    run = tmp_path / "runs" / "grpo"
    for args in (["finetune", str(path)], ["eval", str(run), "--compare-base"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    log = [e for e in read_log(run) if "loss" in e]
    assert [e["step"] for e in log] == [1, 2]
    for key in ("rewards/exact_match/mean", "rewards/iso_date/mean", "reward", "completions/mean_length"):
        assert all(key in e for e in log), key
    results = json.loads((run / "eval.json").read_text())
    assert set(results) == {"base", "tuned"} and "exact_match" in results["tuned"]
    predictions = [json.loads(line) for line in (run / "eval_predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == ["four", "five", "six", "seven"]
    result = CliRunner().invoke(app, ["merge-adapter", str(run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
