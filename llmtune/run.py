"""The one readable path: recipe -> tokenizer -> data -> model -> method -> trainer -> run directory."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune import artifacts
from llmtune.artifacts import RunDir
from llmtune.data import prepare_data
from llmtune.errors import LLMTuneError
from llmtune.methods import ADAPTER_METHODS, METHODS
from llmtune.models import load_model, load_tokenizer, parameter_counts
from llmtune.objectives import OBJECTIVES
from llmtune.recipe import OutputSpec, Recipe, load_recipe


@dataclass
class FinetuneResult:
    run: RunDir
    metrics: dict[str, Any]


def finetune(recipe_path: str | Path, overrides: list[str] | None = None, overwrite: bool = False) -> FinetuneResult:
    recipe = load_recipe(recipe_path, overrides)
    out = Path(recipe.output.dir or Path("runs") / Path(recipe_path).stem).expanduser().resolve()
    recipe = recipe.model_copy(update={"output": OutputSpec(dir=str(out))})
    # Refuse an occupied run directory before any slow step, and write nothing until data and model are ready.
    artifacts.check_run_dir_free(out, overwrite)

    tokenizer = load_tokenizer(recipe.tokenizer or recipe.model)
    data = prepare_data(recipe, tokenizer)
    _print_data_report(data.report, recipe.data.max_length)

    from transformers import set_seed

    set_seed(recipe.training.seed)
    quantization = recipe.method if recipe.method.name == "qlora" else None
    model = load_model(recipe.model, recipe.training.dtype, quantization)
    model = METHODS[recipe.method.name](recipe.method, model, tokenizer)
    counts = parameter_counts(model)
    print(
        f"method {recipe.method.name}: training {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({100 * counts['trainable'] / counts['total']:.3f}%)",
        flush=True,
    )

    run = artifacts.create_run_dir(out, recipe, overwrite)
    trainer = OBJECTIVES[recipe.objective.name](
        recipe, model, tokenizer, data, run.path, callbacks=[_jsonl_log_callback(run.file(artifacts.TRAINER_LOG_FILE))]
    )
    started = time.time()
    try:
        train_output = trainer.train()
        if not math.isfinite(train_output.training_loss):
            raise LLMTuneError(
                f"training loss is {train_output.training_loss}; lower training.learning_rate or check the data"
            )
        metrics: dict[str, Any] = {
            "train_loss": train_output.training_loss,
            "steps": train_output.global_step,
            "train_seconds": round(time.time() - started, 2),
            "parameters": counts,
            "data": data.report,
        }
        if data.eval is not None:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
        _save_weights(run, model, recipe)
        with artifacts.staged_dir(run.tokenizer) as staging:
            tokenizer.save_pretrained(staging)
        artifacts.write_json(run.file(artifacts.METRICS_FILE), metrics)
    except BaseException as e:
        artifacts.finish_run(run, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed")
        raise
    artifacts.finish_run(run, "completed")
    return FinetuneResult(run=run, metrics=metrics)


def _save_weights(run: RunDir, model: Any, recipe: Recipe) -> None:
    target = run.adapter if recipe.method.name in ADAPTER_METHODS else run.model
    # Staged, so a crash while writing never leaves a half-written adapter where eval would load it.
    with artifacts.staged_dir(target) as staging:
        model.save_pretrained(staging, safe_serialization=True)


def _print_data_report(report: dict[str, Any], max_length: int) -> None:
    for split, c in report.items():
        cut = ""
        if c["truncated"] or c["dropped"]:
            cut = f"; over max_length={max_length}: {c['truncated']} truncated, {c['dropped']} dropped"
        print(
            f"data {split}: {c['rows']} rows, {c['tokens']:,} tokens, {c['loss_tokens']:,} carry loss{cut}", flush=True
        )


def _jsonl_log_callback(path: Path):
    """A Trainer callback appending every log entry to the run's trainer_log.jsonl as it happens."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLog()
