"""How lm-eval's results become llmtune's table rows, and how a task's data_files are found."""

from __future__ import annotations

from pathlib import Path

from llmtune.harness import _metrics, _task_manager, _task_spec


def test_results_become_task_metric_rows_with_filters_named_and_non_numbers_dropped():
    results = {
        "gsm8k": {
            "alias": "gsm8k",
            "exact_match,strict-match": 0.25,
            "exact_match_stderr,strict-match": 0.1,
            "exact_match,flexible-extract": 0.5,
            "exact_match_stderr,flexible-extract": "N/A",
        },
        "tiny": {"name": "tiny", "sample_len": 1, "acc,none": 1, "acc_stderr,none": float("nan")},
    }
    assert _metrics(results) == {
        "gsm8k/exact_match,strict-match": 0.25,
        "gsm8k/exact_match_stderr,strict-match": 0.1,
        "gsm8k/exact_match,flexible-extract": 0.5,
        "tiny/acc": 1.0,
    }


def test_relative_data_files_are_read_next_to_the_task_yaml(tmp_path: Path):
    (tmp_path / "rows.jsonl").write_text('{"q": "a", "choices": ["x", "y"], "answer": 0}\n')
    (tmp_path / "task.yaml").write_text(
        "task: t_relative\ndataset_path: json\noutput_type: multiple_choice\ntest_split: test\n"
        "dataset_kwargs:\n  data_files:\n    test: [rows.jsonl, /abs/other.jsonl, missing-*.jsonl]\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
    )
    manager = _task_manager(tmp_path, defaults=False)
    spec = _task_spec(manager, "t_relative", tmp_path)
    # Found next to the YAML: absolute; absolute already, or matching nothing there: left for lm-eval as written.
    assert spec["dataset_kwargs"]["data_files"] == {
        "test": [str(tmp_path / "rows.jsonl"), "/abs/other.jsonl", "missing-*.jsonl"]
    }
    assert spec["doc_to_text"] == "{{q}}" and spec["task"] == "t_relative"
    # A task outside the include directory is passed by name.
    assert _task_spec(manager, "t_relative", None) == "t_relative"
