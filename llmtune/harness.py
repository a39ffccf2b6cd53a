"""Benchmarks through lm-evaluation-harness: its tasks scored on a tuned run (adapter applied, nothing merged)
and on the base the run started from, with the harness's own metrics and standard errors.

lm-eval is imported inside the functions: importing it and indexing its ~15,000 task files take tens of
seconds, which `llmtune --help` and a plain `llmtune eval` must not pay.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import glob
import logging
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune import artifacts
from llmtune.accel import on_device
from llmtune.artifacts import is_run_dir
from llmtune.data import prepare_tokenizer
from llmtune.errors import LLMTuneError, first_line
from llmtune.models import hub_reachable, load_base_model, load_recipe_tokenizer, load_tuned
from llmtune.recipe import Recipe, load_recipe
from llmtune.recipe.training import EvalSpec

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# The harness drives a language model: these are the objectives' model kinds it can score.
SCORABLE_KINDS = ("causal-lm", "seq2seq-lm")


@dataclass
class HarnessReport:
    results: dict[str, dict[str, float]]  # {"tuned": {"TASK/METRIC": value, "TASK/METRIC_stderr": ...}, "base": ...}
    tasks: dict[str, dict[str, int]]  # per task: examples scored, examples in its split, few-shot examples
    out: Path | None

    def summary(self) -> list[str]:
        lines = [
            f"{name}: {t['examples']} of {t['documents']} examples, {t['num_fewshot']}-shot"
            for name, t in self.tasks.items()
        ]
        return lines + ([f"lm-eval results in {self.out}"] if self.out else [])


def evaluate_harness(
    target: str | Path,
    tasks: str,
    compare_base: bool = False,
    include: Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    chat: bool = False,
    out: Path | None = None,
    overrides: list[str] | None = None,
) -> HarnessReport:
    """Run lm-eval tasks (comma-separated names) on a run directory's tuned model, and on its base with
    `compare_base`; a recipe or a model reference is scored as its base model.

    Args:
        include: a directory of task YAML files, added to lm-eval's own tasks (and taking precedence).
        limit: score at most this many examples of each task.
        num_fewshot: examples from the task's own few-shot split put before each question (default: the task's).
        chat: format the prompts with the tokenizer's chat template (the run's, as trained), few-shot
            examples as earlier turns; lm-eval's default, and that of published numbers, is plain text.
    """
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    if not names:
        raise LLMTuneError("--harness: give one or more lm-eval task names, comma-separated (e.g. hellaswag,arc_easy)")
    if include is not None and not include.is_dir():
        raise LLMTuneError(f"{include}: --harness-include needs a directory of lm-eval task YAML files")
    # Tasks first, their datasets fetched: a typo or a dataset out of reach should not wait for the model.
    manager = _resolve_tasks(names, include)
    offline = _offline()
    with _quiet():
        loaded = [task for name in names for task in _load_task(manager, name, include, offline)]
    path = Path(target)
    model, tokenizer, recipe, label = _load_target(path, overrides or [])
    settings = {
        "batch_size": (recipe.eval if recipe else EvalSpec()).batch_size,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "apply_chat_template": chat,
        "system_instruction": recipe.data.system_prompt if recipe and chat else None,
    }
    raw = {label: _run(model, tokenizer, loaded, manager, **settings)}
    if compare_base and label == "tuned":
        # Imported here: evaluation imports the objectives, and with them TRL.
        from llmtune.evaluation import _base_of

        with _base_of(model, recipe, tokenizer) as base:
            # The same task objects: each evaluation rebuilds its requests and reseeds its few-shot sampler.
            raw["base"] = _run(base, tokenizer, loaded, manager, **settings)
    results = {column: _metrics(r["results"]) for column, r in raw.items()}
    first = raw[label]
    task_facts = {
        name: {
            "examples": counts["effective"],
            "documents": counts["original"],
            "num_fewshot": first["n-shot"].get(name, 0),
        }
        for name, counts in first["n-samples"].items()
    }
    out = out or (path / artifacts.HARNESS_FILE if label == "tuned" else None)
    if out is not None:
        artifacts.write_json(
            out,
            {
                "lm_eval": metadata.version("lm_eval"),
                "tasks": task_facts,
                "limit": limit,
                "chat_template": chat,
                "results": results,
            },
        )
    return HarnessReport(results=results, tasks=task_facts, out=out)


def _load_target(
    path: Path, overrides: list[str]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Recipe | None, str]:
    """The model to score, its tokenizer, its recipe (None for a bare model reference) and its column."""
    if is_run_dir(path):
        artifacts.open_run(path)
        recipe = load_recipe(path / artifacts.RECIPE_FILE, overrides)
        _check_scorable(recipe, path)
        model, tokenizer = load_tuned(path)
        return on_device(model), tokenizer, recipe, "tuned"
    if path.is_file():
        recipe = load_recipe(path, overrides)
        _check_scorable(recipe, path)
        tokenizer = load_recipe_tokenizer(recipe)
        prepare_tokenizer(recipe, tokenizer)
        return on_device(load_base_model(recipe, quantized=False, tokenizer=tokenizer)), tokenizer, recipe, "base"
    if overrides:
        raise LLMTuneError(f"{path}: --set changes a recipe, and a model reference has none; give a recipe or a run")
    from llmtune.generation import load_generator

    generator = load_generator(path)
    return generator.model, generator.tokenizer, None, "base"


def _check_scorable(recipe: Recipe, path: Path) -> None:
    kind = recipe.objective.model_kind
    if kind not in SCORABLE_KINDS:
        raise LLMTuneError(
            f"{path}: objective {recipe.objective.name} makes a {kind} model; lm-eval benchmarks score language "
            f"models ({', '.join(SCORABLE_KINDS)}); `llmtune eval {path}` without --harness scores this one"
        )


@functools.cache
def _task_manager(include: Path | None, defaults: bool) -> TaskManager:
    """lm-eval's task index; kept for the process, since building the default one reads every task file."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include) if include else None, include_defaults=defaults)


def _known(manager: TaskManager, name: str) -> bool:
    return name in manager.task_index or (name.endswith((".yaml", ".yml")) and Path(name).is_file())


def _resolve_tasks(names: list[str], include: Path | None) -> TaskManager:
    """A task manager that knows every name: the include directory's alone when it has them all (fast), else
    lm-eval's own tasks as well; an unknown name is an error naming its close matches."""
    with _quiet():
        if include is not None:
            local = _task_manager(include, defaults=False)
            if all(_known(local, n) for n in names):
                return local
        manager = _task_manager(include, defaults=True)
    for name in names:
        if not _known(manager, name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=5, cutoff=0.6)
            raise LLMTuneError(
                f"unknown lm-eval task {name!r}"
                + (f"; close matches: {', '.join(close)}" if close else "")
                + "; `lm-eval ls tasks` lists lm-eval's tasks, --harness-include DIR adds local task YAML files"
            )
    return manager


def _run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list,
    manager: TaskManager,
    **settings: Any,
) -> dict[str, Any]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    model.eval()
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.pop("batch_size"))
        return lm_eval.simple_evaluate(lm, tasks=tasks, task_manager=manager, log_samples=False, **settings)


def _load_task(manager: TaskManager, name: str, include: Path | None, offline: bool) -> list:
    """Build one task, group or tag (this downloads its datasets), turning a dataset that cannot be fetched
    into one line."""
    try:
        with _datasets_offline(offline):
            loaded = manager.load([_task_spec(manager, name, include)])
    except ConnectionError as e:
        if offline:
            raise LLMTuneError(
                f"lm-eval task {name!r} downloads its dataset from the Hugging Face Hub, which is not reachable "
                f"from here ({first_line(e)}); run it with network access, or offline give --harness-include DIR "
                "with local task YAML files whose dataset_path is json (dataset_kwargs.data_files: local files)"
            ) from None
        raise LLMTuneError(f"lm-eval task {name!r}: its dataset could not be fetched: {first_line(e)}") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LLMTuneError(f"lm-eval task {name!r}: {first_line(e)}") from None
    groups = list(loaded.get("groups", {}).values())
    # A group comes first among its subgroups and holds its tasks; a tag is only its tasks.
    return groups[:1] or list(loaded["tasks"].values())


def _task_spec(manager: TaskManager, name: str, include: Path | None) -> str | dict[str, Any]:
    """The name, or for a task YAML in the include directory whose data_files are relative to the YAML itself,
    its config with those paths made absolute: lm-eval hands them to `datasets` as they are, relative to the
    working directory, so a task directory would work only from inside it."""
    entry = manager.task_index.get(name)
    if include is None or entry is None or entry.yaml_path is None or not _inside(entry.yaml_path, include):
        return name
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    if entry.kind is not Kind.TASK:
        return name
    config = load_yaml(entry.yaml_path)
    kwargs = config.get("dataset_kwargs") or {}
    if "data_files" not in kwargs:
        return name
    here = entry.yaml_path.resolve().parent
    files = _map_paths(kwargs["data_files"], lambda p: str(here / p) if glob.glob(str(here / p)) else p)
    return {**config, "dataset_kwargs": {**kwargs, "data_files": files}}


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def _map_paths(files: Any, fix) -> Any:
    """data_files as `datasets` takes them: a path, a list of paths, or split -> path(s); absolute ones kept."""
    if isinstance(files, str):
        return files if Path(files).is_absolute() else fix(files)
    if isinstance(files, list):
        return [_map_paths(f, fix) for f in files]
    if isinstance(files, dict):
        return {split: _map_paths(f, fix) for split, f in files.items()}
    return files


def _offline() -> bool:
    import datasets

    return bool(datasets.config.HF_HUB_OFFLINE) or not hub_reachable()


@contextlib.contextmanager
def _datasets_offline(offline: bool):
    """Without a network, put `datasets` in offline mode: a Hub dataset then fails at once (or loads from the
    local cache) instead of retrying for half a minute."""
    import datasets

    before = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _quiet():
    """lm-eval logs every setting at INFO and WARNING (its own seeds, an 'already initialized model'); the
    results are what the user asked for."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's per-task results ("acc,none": 0.5, "acc_stderr,none": 0.29) as flat rows "TASK/acc",
    "TASK/acc_stderr"; a filter other than none stays in the name ("exact_match,strict-match")."""
    rows = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, name, sample_len, and "N/A" standard errors
            if not math.isfinite(value):
                continue  # a standard error over one example
            metric, kind = key.split(",", 1)
            rows[f"{task}/{metric}" + ("" if kind == "none" else f",{kind}")] = float(value)
    return rows
