"""Progress bars where users wait: eval's scoring passes, per model, and only there."""

from __future__ import annotations

import re

from helpers import write_tiny_recipe
from typer.testing import CliRunner

from llmtune import progress
from llmtune.cli.app import app
from llmtune.run import finetune


def test_eval_shows_a_bar_per_model_and_pass_that_reaches_its_total(tmp_path, one_torch_thread):
    run = finetune(write_tiny_recipe(tmp_path), ["training.max_steps=1"]).run.path
    result = CliRunner().invoke(app, ["eval", str(run), "--compare-base"])
    assert result.exit_code == 0, result.output
    # The tiny recipe holds out 6 rows; every pass ends at 6/6 with a rate in rows per second.
    finished = set(re.findall(r"(\w+ \w+): 100%\|[^|]*\| 6/6 \[[^\]]*row/s\]", result.stderr))
    assert finished == {"tuned score", "tuned generate", "base score", "base generate"}, result.stderr
    assert "row/s" not in result.stdout


def test_scoring_loops_outside_eval_show_no_bar(capsys):
    with progress.rows(3, "score") as advance:
        advance(3)
    with progress.scoring("tuned"), progress.rows(3, "score") as advance:
        advance(3)
    err = capsys.readouterr().err
    assert err.count("3/3") == 1 and "tuned score" in err
