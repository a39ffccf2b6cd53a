"""`llmtune generate TARGET --input prompts.jsonl --output out.jsonl`: batched, resumable, checked before loading."""

from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_error, expect_error, ok, read_jsonl, run_cli, write_jsonl, write_tiny_recipe
from typer.testing import CliRunner

import llmtune.generation
from llmtune.cli.app import app
from llmtune.errors import LLMTuneError
from llmtune.generation import Sampling, complete, generate_file, load_generator
from llmtune.run import finetune

ROWS = [
    {"prompt": "Count: ab ab", "id": 1},
    {"prompt": "Count: ab"},
    {"messages": [{"role": "user", "content": "Count: ab ab ab"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "id": "x"},
    {"prompt": "Count: ab ab ab ab ab"},
]
SAMPLING = ["--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate_file")
    return finetune(write_tiny_recipe(root), ["training.max_steps=1"]).run.path


def _generate(run, prompts, out, *extra):
    result = CliRunner().invoke(
        app,
        ["generate", str(run), "--input", str(prompts), "--output", str(out), "--batch-size", "2", *SAMPLING, *extra],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return result


def test_each_row_gets_the_greedy_completion_of_its_prompt_or_conversation(run, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    result = _generate(run, prompts, tmp_path / "out" / "completions.jsonl")
    assert "wrote 5 rows" in result.stdout
    # The bar counts rows and ends at the total.
    assert "5/5" in result.stderr and "row/s" in result.stderr
    written = read_jsonl(tmp_path / "out" / "completions.jsonl")
    assert [{k: v for k, v in w.items() if k not in ("prediction", "finish_reason", "tokens")} for w in written] == ROWS
    gen = load_generator(str(run))
    sampling = Sampling(max_new_tokens=8)
    for row, w in zip(ROWS, written, strict=True):
        ids = gen.encode(row["messages"] if "messages" in row else [{"role": "user", "content": row["prompt"]}])
        [alone] = gen.generate([ids], sampling)
        assert (w["prediction"], w["finish_reason"], w["tokens"]) == (alone.text, alone.finish_reason, alone.tokens)
        assert 1 <= w["tokens"] <= 8
    # And what `llmtune generate RUN PROMPT` prints for the same prompt.
    assert written[0]["prediction"] == complete(str(run), ROWS[0]["prompt"], sampling)


def test_a_rerun_continues_after_the_last_whole_row(run, tmp_path, monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    full, out = tmp_path / "full.jsonl", tmp_path / "out.jsonl"
    _generate(run, prompts, full)
    lines = full.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:15])  # two rows, then a line cut off by a crash
    generated = []
    real = llmtune.generation.Generator.generate
    monkeypatch.setattr(
        llmtune.generation.Generator, "generate", lambda self, p, *a, **k: generated.extend(p) or real(self, p, *a, **k)
    )
    result = _generate(run, prompts, out)
    assert "wrote 3 rows" in result.stdout and "after the 2 already there" in result.stdout
    assert len(generated) == 3
    assert out.read_bytes() == full.read_bytes()
    # Finished: a third run loads no model and leaves the file as it is.
    monkeypatch.setattr(llmtune.generation, "load_generator", _no_model)
    assert "wrote 0 rows" in _generate(run, prompts, out).stdout
    assert out.read_bytes() == full.read_bytes()


def test_an_output_of_another_input_is_refused_and_overwrite_starts_over(run, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    out = write_jsonl(tmp_path / "out.jsonl", [{**ROWS[0], "prediction": "x"}, {"prompt": "other", "prediction": "y"}])
    result = run_cli("generate", str(run), "--input", str(prompts), "--output", str(out), *SAMPLING, cwd=tmp_path)
    assert_one_line_error(result, "out.jsonl row 2", "another input", "--overwrite")
    assert len(read_jsonl(out)) == 2  # left as it was
    longer = write_jsonl(tmp_path / "longer.jsonl", [{**r, "prediction": "x"} for r in ROWS + ROWS[:1]])
    with expect_error("longer.jsonl has 6 rows", "more than the 5"):
        generate_file(str(run), prompts, longer, Sampling(max_new_tokens=8))
    _generate(run, prompts, out, "--overwrite")
    assert [r.get("id") for r in read_jsonl(out)] == [r.get("id") for r in ROWS]


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded")


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("{not json", "prompts.jsonl:3: invalid JSON"),
        ('["a list"]', "prompts.jsonl:3: each line must be a JSON object"),
        ('{"text": "no prompt"}', "prompts.jsonl row 3: needs exactly one of 'prompt'"),
        ('{"prompt": "a", "messages": []}', "prompts.jsonl row 3: needs exactly one of 'prompt'"),
        ('{"prompt": 7}', "prompts.jsonl row 3: 'prompt' must be a non-empty string"),
        ('{"messages": "hi"}', "prompts.jsonl row 3: column 'messages' must be a non-empty list"),
        ('{"messages": [{"role": "user"}]}', "prompts.jsonl row 3: messages[0] needs a role"),
        ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', "end with a user"),
        ('{"prompt": "a", "prediction": "b"}', "prompts.jsonl row 3: has 'prediction'"),
    ],
)
def test_a_bad_row_is_named_before_any_model_loads(tmp_path, monkeypatch, line, fragment):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n" + line + "\n", encoding="utf-8")
    monkeypatch.setattr(llmtune.generation, "load_generator", _no_model)
    with expect_error(fragment):
        generate_file("tiny:llama", prompts, tmp_path / "out.jsonl", Sampling())
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_rows_and_arguments_exit_2_with_one_line(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": ""}\n', encoding="utf-8")
    out = str(tmp_path / "out.jsonl")
    result = run_cli("generate", "tiny:llama", "--input", str(prompts), "--output", out, cwd=tmp_path)
    assert_one_line_error(result, "prompts.jsonl row 2")
    for args, fragment in [
        ([], "give a PROMPT or --input FILE"),
        (["hi", "--input", str(prompts), "--output", out], "not both"),
        (["--input", str(prompts)], "--input needs --output"),
        (["hi", "--output", out], "--output and --overwrite go with --input"),
    ]:
        with pytest.raises(LLMTuneError, match=fragment):
            CliRunner().invoke(app, ["generate", "tiny:llama", *args], catch_exceptions=False)
    with pytest.raises(LLMTuneError, match="must be a JSONL file"):
        generate_file("tiny:llama", tmp_path / "prompts.csv", tmp_path / "out.jsonl", Sampling())


def test_single_prompt_generate_still_prints_its_answer(run, tmp_path):
    answer = ok(run_cli("generate", str(run), "Count: ab", *SAMPLING, cwd=tmp_path)).stdout.strip()
    assert answer == complete(str(run), "Count: ab", Sampling(max_new_tokens=8))
