"""User tools: `llmtune data preview`, `llmtune recipes ...`, `llmtune init`, and the help every command shows.

Preview numbers are checked against counts made by hand: tiny:llama's tokenizer has no merges, so every byte
is one token and every special token (<s>, <|im_start|>, <|im_end|>) is one more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
import yaml
from helpers import RECIPES as REPO_RECIPES
from helpers import chat_rows, expect_error, write_jsonl
from typer.testing import CliRunner

from llmtune.cli import recipes as recipes_cli
from llmtune.cli.app import app
from llmtune.data import IGNORE_INDEX
from llmtune.errors import LLMTuneError
from llmtune.methods import METHODS
from llmtune.models import load_tokenizer
from llmtune.preview import build_preview, check_labels, pad_tokens, preview_data
from llmtune.recipe import dump_recipe, load_recipe


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny:llama")


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(app, list(args), input=input)


def error_of(result) -> str:
    """The one-line LLMTuneError a command raised (main() prints it; CliRunner hands it back)."""
    assert isinstance(result.exception, LLMTuneError), result.output
    message = str(result.exception)
    assert "\n" not in message
    return message


# --- counts by hand -----------------------------------------------------------------------------------


def hand_count(row: dict) -> tuple[int, int]:
    """(tokens, position of the first loss token) of a chat row under tiny:llama's template.

    The template writes <s>, then per message <|im_start|> role \\n content <|im_end|> \\n; the loss covers the
    last answer and its <|im_end|>, not the newline after it.
    """
    tokens = 1 + sum(1 + len(m["role"]) + 1 + len(m["content"].encode()) + 1 + 1 for m in row["messages"])
    answer = row["messages"][-1]["content"]
    return tokens, tokens - 1 - (len(answer.encode()) + 1)


def padded(lengths: list[int], batch_size: int) -> int:
    total = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        total += sum(max(batch) - n for n in batch)
    return total


# --- data preview -------------------------------------------------------------------------------------


def test_preview_summary_matches_hand_count(make_recipe):
    preview = preview_data(make_recipe(rows=24), n=3)
    rows = chat_rows(24)
    lengths = [hand_count(r)[0] for r in rows]
    loss = sum(len(r["messages"][-1]["content"]) + 1 for r in rows)
    assert preview.counts == {"rows": 24, "truncated": 0, "dropped": 0, "tokens": sum(lengths), "loss_tokens": loss}
    assert preview.loss_fraction == pytest.approx(loss / sum(lengths))
    assert preview.batch_size == 4
    assert preview.pad_tokens == padded(lengths, 4)
    assert preview.padding_waste == pytest.approx(padded(lengths, 4) / (sum(lengths) + padded(lengths, 4)))
    assert len(preview.rows) == 3


def test_highlighted_tokens_are_exactly_the_loss_tokens(make_recipe, tok):
    preview = preview_data(make_recipe(), n=5)
    for tokens, row in zip(preview.rows, chat_rows(5), strict=True):
        answer = row["messages"][-1]["content"]
        length, first_loss = hand_count(row)
        assert len(tokens) == length
        assert [t.loss for t in tokens] == [first_loss <= i < length - 1 for i in range(length)]
        assert "".join(t.text for t in tokens if t.loss) == answer + "<|im_end|>"
        # The texts join into the row as the chat template renders it: nothing hidden, nothing added.
        rendered = tok.apply_chat_template(row["messages"], tokenize=False)
        assert "".join(t.text for t in tokens) == rendered
        assert [t.eos for t in tokens] == [t.text == "<|im_end|>" for t in tokens]
        assert tokens[length - 2].eos and tokens[length - 2].loss


def test_token_texts_keep_characters_split_over_byte_tokens(make_recipe, tmp_path):
    recipe = make_recipe()
    rows = [{"messages": [{"role": "user", "content": "Grüße"}, {"role": "assistant", "content": "naïve ✓"}]}]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    tokens = preview_data(recipe, n=1).rows[0]
    assert "".join(t.text for t in tokens if t.loss) == "naïve ✓<|im_end|>"
    assert sum(t.loss for t in tokens) == len("naïve ✓".encode()) + 1  # one token per byte


@pytest.mark.parametrize("overflow", ["truncate", "drop"])
def test_preview_counts_truncated_and_dropped_rows(make_recipe, overflow):
    max_length = 45
    recipe = make_recipe(
        data={"train": "data/train.jsonl", "eval": "data/eval.jsonl", "max_length": max_length, "overflow": overflow}
    )
    preview = preview_data(recipe)  # truncated rows lost their EOS: that must not count as a missing EOS
    counted = [hand_count(r) for r in chat_rows(24)]
    long = [(n, first) for n, first in counted if n > max_length]
    if overflow == "truncate":
        truncated = sum(first < max_length for _, first in long)
        kept = [min(n, max_length) for n, first in counted if n <= max_length or first < max_length]
    else:
        truncated = 0
        kept = [n for n, _ in counted if n <= max_length]
    assert 0 < len(long) < 24
    assert preview.counts["truncated"] == truncated
    assert preview.counts["dropped"] == len(long) - truncated
    assert preview.counts["rows"] == len(kept)
    assert preview.counts["tokens"] == sum(kept)
    assert preview.pad_tokens == padded(kept, 4)


def test_pad_tokens_by_hand():
    assert pad_tokens([3, 5, 2, 2, 7], 2) == (5 - 3) + 0 + 0
    assert pad_tokens([4, 4, 4], 8) == 0
    assert pad_tokens([1, 9], 1) == 0


def test_a_row_with_every_label_masked_fails(make_recipe, tok, monkeypatch):
    with expect_error("train.jsonl: training row 1", "every label masked"):
        check_labels([([0, 70, 2], [IGNORE_INDEX] * 3)], tok, "train.jsonl")

    import llmtune.preview

    real = llmtune.preview.encode_dataset

    def mask_row_two(*args, **kwargs):
        dataset, counts = real(*args, **kwargs)
        labels = [list(row) for row in dataset["labels"]]
        labels[1] = [IGNORE_INDEX] * len(labels[1])
        return dataset.remove_columns("labels").add_column("labels", labels), counts

    monkeypatch.setattr(llmtune.preview, "encode_dataset", mask_row_two)
    with expect_error("training row 2", "every label masked"):
        preview_data(make_recipe())


def test_no_eos_in_the_loss_fails(make_recipe, tok):
    # An eos_token that is not one token of the vocabulary: the response ends with its text, split into bytes,
    # and the model never sees an EOS id among its targets.
    broken = load_tokenizer("tiny:llama")
    broken.eos_token = broken.pad_token = "</s>"
    broken.chat_template = broken.chat_template.replace("<|im_end|>", "")  # turns end with no token at all
    with expect_error("no stop token ('</s>',", "24 of 24 training rows", "first: row 1", "would not learn to stop"):
        build_preview(load_recipe(make_recipe()), broken)

    rows = [([0, 70, 2], [IGNORE_INDEX, 70, 2]), ([0, 70, 71], [IGNORE_INDEX, 70, 71])]
    with expect_error("1 of 2 training rows", "first: row 2"):
        check_labels(rows, tok, "f")
    check_labels(rows, tok, "f", truncated_length=3)  # a row cut at max_length may have lost its EOS


def fake_run(tmp_path: Path, recipe: Path, chat_template: str) -> Path:
    """A completed run directory as finetune leaves it, as far as preview reads it."""
    run = tmp_path / "runs" / "done"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(dump_recipe(load_recipe(recipe)))
    (run / "manifest.json").write_text(json.dumps({"status": "completed"}))
    saved = load_tokenizer("tiny:llama")
    saved.chat_template = chat_template
    saved.save_pretrained(run / "tokenizer")
    return run


def test_run_whose_saved_chat_template_differs_fails(make_recipe, tmp_path, tok):
    changed = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    run = fake_run(tmp_path, make_recipe(), changed)
    with expect_error(f"{run / 'tokenizer'}: the chat template saved for inference differs", "'tiny:llama'"):
        preview_data(run)


def test_run_with_the_same_chat_template_previews(make_recipe, tmp_path, tok):
    run = fake_run(tmp_path, make_recipe(), tok.chat_template)
    assert preview_data(run, n=1).counts["rows"] == 24


def test_preview_cli_marks_loss_and_eos(make_recipe):
    result = invoke("data", "preview", str(make_recipe()), "--n", "2", "--set", "training.batch_size=2")
    assert result.exit_code == 0, result.output
    # CliRunner's output is not a terminal, so loss spans are bracketed instead of coloured.
    assert "⟦one<|im_end|>⟨EOS⟩⟧" in result.output
    assert "⟦two<|im_end|>⟨EOS⟩⟧" in result.output and "⟦three" not in result.output
    assert "24 training rows" in result.output and "padding waste at batch_size=2" in result.output


def test_preview_cli_error_is_one_line(make_recipe, tmp_path):
    run = fake_run(tmp_path, make_recipe(), "{{ messages }}")
    assert "chat template" in error_of(invoke("data", "preview", str(run)))


# --- recipes ------------------------------------------------------------------------------------------


def test_recipes_list_shows_every_recipe_with_its_description():
    result = invoke("recipes", "list")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert set(lines) == {p.stem for p in REPO_RECIPES.glob("*.yaml")}
    assert lines["quickstart"].split()[1:4] == ["lora", "sft", "builtin:smollm2-135m-instruct"]
    assert lines["quickstart"].endswith(
        "Quickstart: teach SmolLM2-135M-Instruct to write dates in ISO format with LoRA."
    )
    # A first sentence that wraps over two comment lines is joined.
    assert lines["prefix"].endswith("in every attention layer; the weights never change.")


def test_recipes_list_reports_a_broken_recipe_and_keeps_the_rest(make_recipe, tmp_path, monkeypatch):
    make_recipe()
    (tmp_path / "broken.yaml").write_text("# Broken.\nmodel: tiny:llama\nmethod: {name: lora, rnak: 4}\n")
    monkeypatch.setenv("LLMTUNE_RECIPES", str(tmp_path))
    lines = invoke("recipes", "list").output.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["broken", "tiny"]
    assert "invalid:" in lines[1] and "did you mean 'r'?" in lines[1]


def test_recipes_show_prints_the_yaml_verbatim():
    result = invoke("recipes", "show", "quickstart")
    assert result.output == (REPO_RECIPES / "quickstart.yaml").read_text()


def test_unknown_recipe_name_lists_the_names():
    message = error_of(invoke("recipes", "show", "quickstrat"))
    assert "'quickstrat' not found" in message
    assert message.endswith("available: " + ", ".join(sorted(p.stem for p in REPO_RECIPES.glob("*.yaml"))))


def test_copy_of_a_shipped_recipe_validates_from_elsewhere(tmp_path, monkeypatch):
    dest = tmp_path / "mine" / "quick.yaml"
    dest.parent.mkdir()
    result = invoke("recipes", "copy", "quickstart", str(dest))
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(dest)
    assert recipe.data.train == str(REPO_RECIPES / "data" / "quickstart" / "train.jsonl")
    assert recipe.data.eval == str(REPO_RECIPES / "data" / "quickstart" / "eval.jsonl")
    text = dest.read_text()
    assert "r: 8                   # higher = more capacity, more memory" in text  # comments survive

    assert "already exists" in error_of(invoke("recipes", "copy", "quickstart", str(dest)))
    dest.write_text("mine")
    assert invoke("recipes", "copy", "quickstart", str(dest), "--overwrite").exit_code == 0
    assert dest.read_text() == text


def test_copy_keeps_paths_relative_when_recipe_and_copy_share_a_directory(make_recipe, tmp_path, monkeypatch):
    make_recipe()  # tmp_path/tiny.yaml reading tmp_path/data/*.jsonl
    monkeypatch.setenv("LLMTUNE_RECIPES", str(tmp_path))
    (tmp_path / "work" / "sub").mkdir(parents=True)
    assert invoke("recipes", "copy", "tiny", str(tmp_path / "work" / "sub")).exit_code == 0
    copied = tmp_path / "work" / "sub" / "tiny.yaml"
    raw = yaml.safe_load(copied.read_text())
    assert raw["data"]["train"] == "../../data/train.jsonl"
    assert load_recipe(copied).data.train == str(tmp_path / "data" / "train.jsonl")
    assert "give a .yaml file name" in error_of(invoke("recipes", "copy", "tiny", str(tmp_path / "missing-dir")))


def test_schema_is_json_naming_every_method(tmp_path):
    result = invoke("recipes", "schema")
    schema = json.loads(result.output)
    assert set(schema["properties"]["method"]["discriminator"]["mapping"]) == set(METHODS)
    assert schema["$defs"]["LoraSpec"]["properties"]["name"]["const"] == "lora"
    assert invoke("recipes", "schema", "--out", str(tmp_path / "s.json")).exit_code == 0
    assert json.loads((tmp_path / "s.json").read_text()) == schema


# --- init ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_init_writes_a_commented_recipe_that_loads(tmp_path, method):
    data = write_jsonl(tmp_path / "data" / "train.jsonl", chat_rows(4))
    out = tmp_path / "recipes" / "mine.yaml"
    result = invoke("init", "--model", "tiny:llama", "--method", method, "--data", str(data), "--out", str(out))
    assert result.exit_code == 0, result.output
    recipe = load_recipe(out)
    assert (recipe.model, recipe.method.name, recipe.data.format) == ("tiny:llama", method, "chat")
    assert recipe.data.train == str(data)
    text = out.read_text()
    assert yaml.safe_load(text)["data"]["train"] == "../data/train.jsonl"
    assert "max_length: 512                # tokens per row" in text
    assert text.startswith(f"# {method} fine-tuning of tiny:llama")


def test_init_guesses_the_format_and_checks_columns(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "Say hi", "output": "hi"}])
    out = tmp_path / "r.yaml"
    assert invoke("init", "--data", str(data), "--out", str(out)).exit_code == 0
    recipe = load_recipe(out)
    assert (recipe.model, recipe.method.name, recipe.data.format) == (
        "builtin:smollm2-135m-instruct",
        "lora",
        "instruction",
    )
    message = error_of(invoke("init", "--data", str(data), "--format", "chat", "--out", str(tmp_path / "s.yaml")))
    assert "column 'messages' not found" in message
    assert "already exists" in error_of(invoke("init", "--data", str(data), "--out", str(out)))


def test_init_without_a_terminal_needs_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "--data is required" in error_of(invoke("init"))


def test_init_asks_for_what_is_missing_in_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes_cli, "_interactive", lambda: True)
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(4))
    out = tmp_path / "asked.yaml"
    # model, method (a typo is asked again), data, format (accept the guess), output file
    answers = ["tiny:llama", "lroa", "dora", str(data), "", str(out)]
    result = invoke("init", input="\n".join(answers) + "\n")
    assert result.exit_code == 0, result.output
    assert "method 'lroa': unknown" in result.output
    recipe = load_recipe(out)
    assert (recipe.model, recipe.method.name, recipe.data.format) == ("tiny:llama", "dora", "chat")


# --- help ---------------------------------------------------------------------------------------------


def all_commands():
    """(argv to reach it, click command) for every command and group under the root."""
    found = []

    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            found.append(([*path, name], sub))
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def test_every_command_help_has_an_example_and_every_option_help_text():
    assert all(param.help for param in typer.main.get_command(app).params)
    commands = all_commands()
    assert {"data", "data preview", "recipes list", "recipes copy", "recipes schema", "init"} <= {
        " ".join(path) for path, _ in commands
    }
    for path, command in commands:
        result = invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Example" in result.output, path
        for param in command.params:
            assert getattr(param, "help", None), (path, param.name)
