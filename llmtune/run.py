"""The one readable path of a run: recipe and run directory -> data -> model and method -> speed plan -> trainer ->
train and save."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtune import accel, artifacts
from llmtune.artifacts import CHECKPOINT_PREFIX, COMPLETE_MARKER, RunDir, complete_checkpoints
from llmtune.data import prepare_tokenizer
from llmtune.errors import LLMTuneError, first_line
from llmtune.methods import METHODS, PEFT_TASK_TYPES
from llmtune.models import load_base_model, load_recipe_tokenizer, parameter_counts
from llmtune.objectives import OBJECTIVES, prepare_data
from llmtune.objectives.base import check_engines
from llmtune.recipe import PushSpec, Recipe, dump_recipe, load_recipe
from llmtune.recipe.rules import DENOISING_OBJECTIVES
from llmtune.report import write_run_report
from llmtune.templates import TEMPLATES
from llmtune.training import (
    LogAtSaveCallback,
    SaveAtEndCallback,
    StopOnSignalCallback,
    StopRequested,
    check_finite,
)


@dataclass
class FinetuneResult:
    run: RunDir
    metrics: dict[str, Any]


def finetune(
    recipe_path: str | Path,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    resume: bool | Path = False,
) -> FinetuneResult:
    """Train as the recipe says and write the run directory.

    Args:
        resume: True to continue the run in the recipe's output directory from its last complete
            checkpoint, or the path of a specific checkpoint.
    """
    # Under torchrun / accelerate launch every process runs this function; only the first writes files.
    main = is_main_process()

    # 1. Recipe, launch and run directory: checked before any slow step; nothing is written yet.
    recipe = load_recipe(recipe_path, overrides)
    out = Path(recipe.output.dir or Path("runs") / Path(recipe_path).stem).expanduser().resolve()
    recipe = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(out)})})
    check_engines(recipe)
    checkpoint = _checkpoint_to_resume(out, recipe, resume) if resume else None
    if checkpoint is None and main:
        artifacts.check_run_dir_free(out, overwrite)

    # 2. Data, tokenized and masked the way the objective trains on it.
    tokenizer = load_recipe_tokenizer(recipe)
    added = prepare_tokenizer(recipe, tokenizer)
    _check_new_tokens(recipe, added)
    data = prepare_data(recipe, tokenizer)
    if checkpoint is not None:
        _check_same_data(RunDir(out), data)

    # 3. The memory plan for the data's longest rows: a run that cannot fit its device stops before weights load.
    _check_memory_plan(recipe, recipe_path, overrides, data, main)

    # 4. Model and tuning method; tokens the chat template added get embedding rows that train.
    model = _build_model(recipe, tokenizer, added)

    # 5. Speed plan: every speed and precision lever decided for this device.
    plan = accel.resolve(recipe, accel.current_device(), model, data.train)
    if main:
        _print_start(recipe, data, model, plan, added)
        _write_run_dir(out, recipe, data, plan, checkpoint, overwrite)
    run = RunDir(out)

    # 6. Trainer, built from the plan's mixed precision, checkpointing and batching.
    stop = StopOnSignalCallback()
    trainer = _build_trainer(recipe, model, tokenizer, data, run, plan, stop)

    # 7. The plan's kernels and levers switched on in the model, now that the trainer has moved it to its device
    #    and cast its trained weights; the fused loss, if the plan has one, is what the trainer computes.
    trainer.llmtune_loss = accel.apply(model, plan)

    # 8. Train and save; the manifest says how the run ended.
    started = time.time()
    stop.install()
    try:
        train_output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        if stop.requested:
            raise StopRequested(
                f"{stop.requested}: stopped after step {trainer.state.global_step} with a checkpoint in {run.path}; "
                f"resume with: llmtune finetune {recipe_path}{_set_flags(overrides)} --resume"
            )
        metrics = _final_metrics(trainer, train_output, checkpoint, started, model, data)
        _save(trainer, run, model, tokenizer, recipe, metrics, main)
    except BaseException as e:
        if main:
            interrupted = isinstance(e, (KeyboardInterrupt, StopRequested))
            artifacts.update_manifest(run, status="interrupted" if interrupted else "failed", finished=artifacts.now())
        raise
    finally:
        stop.uninstall()
    if main:
        artifacts.update_manifest(run, status="completed", finished=artifacts.now())
        write_run_report(run)
        if recipe.output.push_to_hub is not None:
            _push(run, recipe.output.push_to_hub)
    return FinetuneResult(run=run, metrics=metrics)


def _check_memory_plan(recipe: Recipe, recipe_path, overrides: list[str] | None, data: Any, main: bool) -> None:
    from llmtune import plan as planner

    if not recipe.training.check_memory:
        return
    memory = planner.start_plan(recipe, _longest_row(data.train))
    if memory is None:
        return
    if main:
        print(memory.summary(), flush=True)
    if memory.fits:
        return
    fix = planner.propose_fix(memory)
    if fix is None:
        then = planner.no_fix_hint(memory)
    else:
        then = f"it fits with: {planner.fix_command(recipe_path, overrides, fix[0])}"
    raise LLMTuneError(
        f"{recipe_path}: the memory plan needs {planner.gib(memory.needed)}, more than the "
        f"{planner.gib(memory.available)} free on {memory.device.name}; {then} (llmtune plan shows the breakdown), "
        "or set training.check_memory=false to start anyway"
    )


def _longest_row(train: Any) -> int | None:
    """Tokens in the longest training row, where the objective tokenized its rows."""
    if train is None or "input_ids" not in train.column_names:
        return None
    import pyarrow.compute as pc

    lengths = pc.list_value_length(train.data.column("input_ids"))
    return pc.max(lengths).as_py() if len(lengths) else None


def _push(run: RunDir, spec: PushSpec) -> None:
    """Upload the saved run; the run is complete on disk already, so a failed push costs only the upload."""
    from llmtune.push import push

    flags = " --private" * spec.private + " --merged" * spec.merged
    retry = f"llmtune push {shlex.quote(str(run.path))} {spec.repo_id}{flags}"
    print(f"pushing {run.path} to the Hub as {spec.repo_id}", flush=True)
    try:
        result = push(run.path, spec.repo_id, private=spec.private, merged=spec.merged)
    except Exception as e:  # whatever went wrong, the user needs to know the run is safe and how to retry
        raise LLMTuneError(
            f"the run is saved and complete at {run.path}, but the push failed: {first_line(e)}; retry with: {retry}"
        ) from None
    print(f"pushed {len(result.files)} files to {spec.repo_id}: {result.url}", flush=True)


def _check_new_tokens(recipe: Recipe, added: list[str]) -> None:
    if added and not recipe.method.trains_new_tokens:
        plain = ", ".join(n for n, t in TEMPLATES.items() if not t.tokens)
        fix = (
            f"or a template written in plain text ({plain})"
            if _template_added(recipe)
            else "or a tokenizer that has them"
        )
        raise LLMTuneError(
            f"{_adder(recipe)} needs tokens the tokenizer lacks ({_listed(added)}), whose new embedding rows must "
            f"train, and method {recipe.method.name} cannot train them: use lora, qlora, dora or full, {fix}"
        )


def _template_added(recipe: Recipe) -> bool:
    """Whether the tokens added for `recipe` are its chat template's (else its denoising objective's)."""
    return recipe.objective.name not in DENOISING_OBJECTIVES


def _adder(recipe: Recipe) -> str:
    if _template_added(recipe):
        return f"data.chat_template {recipe.data.chat_template!r}"
    return f"objective {recipe.objective.name}"


def _listed(tokens: list[str]) -> str:
    # T5's hundred sentinels would make a line nobody reads.
    return ", ".join(tokens) if len(tokens) <= 4 else f"{tokens[0]} ... {tokens[-1]}"


def _build_model(recipe: Recipe, tokenizer: Any, added: list[str]) -> Any:
    from transformers import set_seed

    method = recipe.method
    set_seed(recipe.training.seed)
    model = load_base_model(recipe, tokenizer=tokenizer)
    task_type = PEFT_TASK_TYPES[recipe.objective.model_kind]
    new_tokens = {"new_tokens": tokenizer.convert_tokens_to_ids(added)} if added and method.saves_adapter else {}
    return METHODS[method.name](method, model, tokenizer, task_type=task_type, **new_tokens)


def _print_start(recipe: Recipe, data: Any, model: Any, plan: accel.SpeedPlan, added: list[str]) -> None:
    _print_data_report(data.report, recipe.data.max_length)
    if added:
        adder = f"chat template {recipe.data.chat_template!r}" if _template_added(recipe) else _adder(recipe)
        print(
            f"{adder}: added {len(added)} special tokens the tokenizer lacked ({_listed(added)}); their embedding "
            "rows start at the mean row and train",
            flush=True,
        )
    counts = parameter_counts(model)
    print(
        f"method {recipe.method.name}: training {counts['trainable']:,} of {counts['total']:,} parameters "
        f"({100 * counts['trainable'] / counts['total']:.3f}%)",
        flush=True,
    )
    print(plan.summary(), flush=True)


def _write_run_dir(
    out: Path, recipe: Recipe, data: Any, plan: accel.SpeedPlan, checkpoint: Path | None, overwrite: bool
) -> None:
    """A new run directory, or the resumed one brought back to its checkpoint."""
    run = RunDir(out)
    facts = {"recipe_sha256": recipe_hash(recipe), "data_fingerprint": data.fingerprint, "data_sources": data.sources}
    if checkpoint is None:
        artifacts.create_run_dir(out, recipe, overwrite, **facts)
    else:
        artifacts.update_manifest(run, status="running", resumed_from=checkpoint.name, **facts)
        _truncate_log(run.file(artifacts.TRAINER_LOG_FILE), _checkpoint_step(checkpoint))
    artifacts.write_json(run.file(artifacts.SPEED_FILE), plan.to_dict())
    for stale in out.glob(f".{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a process killed while writing a checkpoint


def _check_same_data(run: RunDir, data: Any) -> None:
    """Refuse to resume on other data than the run started with, naming the sources that changed."""
    manifest = run.manifest()
    if manifest.get("data_fingerprint", data.fingerprint) == data.fingerprint:
        return
    # Runs started before per-source fingerprints were saved name no source.
    before = manifest.get("data_sources", {})
    changed = [label for label, digest in data.sources.items() if before.get(label, digest) != digest]
    what = f"the rows of {', '.join(changed)}" if changed else "the training data (or its tokenization)"
    raise LLMTuneError(
        f"{run.path}: {what} changed since the run started; resuming would mix two datasets: restore the data, or "
        "start a new run with --overwrite"
    )


def _build_trainer(recipe, model, tokenizer, data, run: RunDir, plan: accel.SpeedPlan, stop) -> Any:
    callbacks = [_jsonl_log_callback(run.file(artifacts.TRAINER_LOG_FILE)), SaveAtEndCallback(), stop]
    # Listed last: it must see every other callback's request for a checkpoint.
    callbacks.append(LogAtSaveCallback())
    trainer = OBJECTIVES[recipe.objective.name].build_trainer(recipe, model, tokenizer, data, run.path, callbacks, plan)
    trainer.llmtune_keep_checkpoints = recipe.training.keep_checkpoints
    trainer.llmtune_recipe_file = run.file(artifacts.RECIPE_FILE)
    return trainer


def _final_metrics(trainer, train_output, checkpoint: Path | None, started: float, model, data) -> dict[str, Any]:
    train_loss = _whole_run_mean_loss(trainer.state, train_output.training_loss, checkpoint)
    check_finite(train_loss, "the mean training loss")
    metrics: dict[str, Any] = {
        "train_loss": train_loss,
        "steps": train_output.global_step,
        "train_seconds": round(time.time() - started, 2),
        "parameters": parameter_counts(model),
        "data": data.report,
    }
    if trainer.eval_dataset is not None:  # objectives that generate (grpo) leave held-out data to `eval`
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    return metrics


def _save(trainer, run: RunDir, model, tokenizer, recipe: Recipe, metrics: dict[str, Any], main: bool) -> None:
    # Mixed precision wrapped the model's forward in autocast; what is saved and used from here on computes
    # in the model's own dtype.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    # Training ran without a KV cache (see objectives.base._trainer); the saved model should generate with one.
    model.config.use_cache = True
    if main:
        _save_weights(run, model, recipe)
        # An objective that trains more than the model (ppo's value head) saves the rest beside the weights.
        if hasattr(trainer, "save_beside_weights"):
            trainer.save_beside_weights(run.path)
        with artifacts.staged_dir(run.tokenizer) as staging:
            tokenizer.save_pretrained(staging)
        artifacts.write_json(run.file(artifacts.METRICS_FILE), metrics)


def is_main_process() -> bool:
    """True outside a multi-process launch, and in its first process (torchrun / accelerate set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


def recipe_hash(recipe: Recipe) -> str:
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()


def _checkpoint_to_resume(out: Path, recipe: Recipe, resume: bool | Path) -> Path:
    if not artifacts.is_run_dir(out):
        raise LLMTuneError(f"{out}: no run to resume (no {artifacts.RECIPE_FILE}); start it without --resume")
    saved = RunDir(out).recipe()
    changed = _changed_keys(saved.model_dump(mode="json"), recipe.model_dump(mode="json"))
    if changed:
        raise LLMTuneError(
            f"{out}: the recipe changed since the run started ({', '.join(changed[:5])}); resume needs the same "
            "recipe and overrides, or start a new run with --overwrite"
        )
    if isinstance(resume, Path):
        checkpoint = resume.expanduser().resolve()
        if not (checkpoint / COMPLETE_MARKER).is_file():
            raise LLMTuneError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
        return checkpoint
    found = complete_checkpoints(out)
    if not found:
        raise LLMTuneError(f"{out}: no complete checkpoint to resume from; start again with --overwrite")
    return found[-1]


def _set_flags(overrides: list[str] | None) -> str:
    return "".join(f" --set {shlex.quote(item)}" for item in overrides or [])


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix(CHECKPOINT_PREFIX))


def _whole_run_mean_loss(state: Any, trainer_mean: float, checkpoint: Path | None) -> float:
    """The mean training loss over every step of the run, also when it resumed from `checkpoint`.

    The Trainer averages over the steps it ran itself. The steps before the checkpoint are in the log
    history restored from it, one entry per logging window, the last one ending at the checkpoint
    (LogAtSaveCallback); each entry is its window's mean.
    """
    if checkpoint is None:
        return trainer_mean
    resumed_at = _checkpoint_step(checkpoint)
    total, previous = 0.0, 0
    for entry in state.log_history:
        if "loss" in entry and previous < entry["step"] <= resumed_at:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    if previous != resumed_at:
        return trainer_mean  # a checkpoint whose log does not reach it: the earlier steps are unknown
    return (total + trainer_mean * (state.global_step - resumed_at)) / state.global_step


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint, so the resumed run's curve continues without repeats."""
    if not path.is_file():
        return
    # Per-step training entries only: the stopped run's end-of-training summary would otherwise appear twice.
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if (entry := json.loads(line))["step"] <= step and "loss" in entry
    ]
    artifacts.write_text(path, "".join(line + "\n" for line in kept))


def _save_weights(run: RunDir, model: Any, recipe: Recipe) -> None:
    target = run.adapter if recipe.method.saves_adapter else run.model
    # Staged, so a crash while writing never leaves a half-written adapter where eval would load it.
    with artifacts.staged_dir(target) as staging:
        if recipe.method.name == "adapter":
            from llmtune.bottleneck import save_adapters

            save_adapters(model, staging, recipe.method)
        elif recipe.method.saves_adapter:
            # Rows a chat template added are saved as trainable tokens; the grown base is rebuilt from its
            # deterministic mean-row start (models.fit_vocabulary), so the whole embedding matrix stays out.
            model.save_pretrained(staging, safe_serialization=True, save_embedding_layers=False)
        else:
            model.save_pretrained(staging, safe_serialization=True)


def _print_data_report(report: dict[str, Any], max_length: int) -> None:
    for split, c in report.items():
        print(f"data {split}: {_data_counts(c, max_length)}", flush=True)
        for key, source in c.get("sources", {}).items():
            print(f"  {key} ({source['path']}): {_data_counts(source, max_length)}", flush=True)


def _data_counts(c: dict[str, Any], max_length: int) -> str:
    cut = ""
    if c["truncated"] or c["dropped"]:
        cut = f"; over max_length={max_length}: {c['truncated']} truncated, {c['dropped']} dropped"
        if c.get("cut_words"):  # token classification: the trailing words of truncated rows go untagged
            cut += f" ({c['cut_words']} trailing words cut, untagged)"
    if "remainder_tokens" in c:
        cut = f" in blocks of {max_length} from {c['documents']} documents"
        if c["remainder_tokens"]:
            cut += f"; the last {c['remainder_tokens']} tokens, shorter than a block, are not trained on"
    if "labels" in c:
        target = ", labels " + ", ".join(f"{name} {n}" for name, n in c["labels"].items())
    elif "loss_tokens" in c:
        target = f", {c['loss_tokens']:,} carry loss"
    else:  # objectives that generate their completions (grpo) have no loss-bearing tokens in the data
        target = ""
    return f"{c['rows']} rows, {c['tokens']:,} tokens{target}{cut}"


def _jsonl_log_callback(path: Path):
    """A Trainer callback appending every log entry to the run's trainer_log.jsonl as it happens."""
    from transformers import TrainerCallback

    class JsonlLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                with path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    return JsonlLog()
