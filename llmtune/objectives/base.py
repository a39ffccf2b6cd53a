"""What every objective shares: the interface the registry holds, training arguments from the recipe, the one
way a trainer is built (llmtune's guards, progress line and logs) and the frozen reference model."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from llmtune import optim
from llmtune.batching import pad_rows
from llmtune.errors import LLMTuneError
from llmtune.recipe import Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from llmtune.accel import SpeedPlan
    from llmtune.data import PreparedData


@dataclass
class Objective:
    """One recipe `objective.name`: how its data is prepared, its trainer built and a model scored on it.

    prepare(recipe, tokenizer) -> PreparedData
    build_trainer(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer
    score(model, tokenizer, samples, recipe, teacher=None) -> (metrics, generations or None)
    """

    prepare: Callable[[Recipe, PreTrainedTokenizerBase], PreparedData]
    build_trainer: Callable[..., Trainer]
    score: Callable[..., tuple[dict[str, float], list[str] | None]]


def check_engines(recipe: Recipe) -> None:
    """Refuse sharding settings this launch cannot honour, before any model loads."""
    import importlib.util
    import os

    t = recipe.training
    if (t.fsdp or t.deepspeed) and "RANK" not in os.environ:
        raise LLMTuneError(
            "training.fsdp / training.deepspeed shard across processes: launch with --nproc N, torchrun or "
            "accelerate launch"
        )
    if t.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise LLMTuneError("training.deepspeed needs the deepspeed package: pip install deepspeed")


def training_args(config_class: type, recipe: Recipe, plan: SpeedPlan, output_dir: Path, **fields):
    """`config_class` (a TrainingArguments subclass) with the recipe's training settings, the speed plan's
    choices and `fields` on top."""
    t = recipe.training
    gpu = plan.device == "cuda"
    return config_class(
        output_dir=str(output_dir),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs or 1.0,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=recipe.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        **optim.trainer_fields(t),
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        gradient_checkpointing=plan.gradient_checkpointing,
        # Sharding engines are accelerate's; the recipe only names their settings.
        fsdp=True if t.fsdp else None,
        fsdp_config=t.fsdp_config or None,
        deepspeed=t.deepspeed,
        # Autocast only as the plan says; TRL would otherwise switch bf16 on by itself.
        bf16=plan.bf16,
        fp16=False,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # training.py rotates checkpoints itself, after each is complete
        eval_strategy="no",
        # TensorBoard is attached by _use_llmtune_logging with a fixed directory; other trackers are passed through.
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",
        dataloader_pin_memory=gpu,
        # Without use_cpu, a CPU-only machine under torchrun trains one independent copy per process.
        use_cpu=not gpu,
        disable_tqdm=False,
        **fields,
    )


def _trainer(trainer_class, args, recipe, model, tokenizer, data, output_dir, callbacks, **extra) -> Trainer:
    """`trainer_class` (a GuardedTrainerMixin subclass) built from a builder's arguments (see sft.build_sft) and
    `args`, with llmtune's progress line and logs; `extra` goes to the trainer (e.g. a reference model)."""
    # With a cache object present, transformers does not derive per-row attention blocks from the
    # restarting position ids of a pack, and rows would attend to each other. Training needs no cache.
    model.config.use_cache = False
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    # Set after init: not every TRL trainer takes it as an argument, and the Trainer reads it when training starts.
    trainer.optimizer_cls_and_kwargs = optim.optimizer_hook(recipe, args)
    _use_llmtune_logging(trainer, output_dir, tensorboard="tensorboard" in recipe.training.report_to)
    if recipe.method.name == "qlora":
        # TRL casts the trainable weights of a quantized model to bfloat16; keep the recipe's compute dtype so
        # the adapter trains and saves at the precision the run directory promises.
        dtype = getattr(torch, recipe.method.compute_dtype)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    return trainer


def _reference_model(
    recipe: Recipe, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> PreTrainedModel | None:
    """The frozen reference policy: None for an adapter (TRL switches the adapter off, no second copy);
    otherwise a second copy of the base model, loaded the way the policy was (also for tiny: and builtin: models,
    which TRL could not reload by name)."""
    from peft import PeftModel

    from llmtune.models import load_base_model

    if isinstance(model, PeftModel):
        return None
    reference = load_base_model(recipe, tokenizer=tokenizer)
    reference.requires_grad_(False)
    return reference.eval()


def _rows_trainer(
    trainer_class: type[Trainer],
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    plan: SpeedPlan,
    collator: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
    **extra: Any,
) -> Trainer:
    """A transformers Trainer over data.py's tokenized rows, padded per batch unless `collator` builds the batches;
    `extra` goes to its init."""
    from transformers import TrainingArguments

    args = training_args(TrainingArguments, recipe, plan, output_dir, remove_unused_columns=False)
    # An encoder-decoder builds its decoder inputs from these labels (shifted right, -100 read as padding).
    collator = collator or pad_rows(tokenizer.pad_token_id)
    return _trainer(
        trainer_class, args, recipe, model, tokenizer, data, output_dir, callbacks, data_collator=collator, **extra
    )


def _use_llmtune_logging(trainer: Trainer, output_dir: Path, tensorboard: bool) -> None:
    from transformers.trainer_callback import ProgressCallback

    from llmtune.training import ProgressLine

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressLine())
    if tensorboard and trainer.is_world_process_zero():
        try:
            from transformers.integrations import TensorBoardCallback

            callback = TensorBoardCallback()
        except RuntimeError:
            return  # raised when the tensorboard package is missing: the run just has no event files
        # Set after init: the callback reopens its writer after training (for the final evaluation) from here.
        callback.logging_dir = str(output_dir / "tensorboard")
        trainer.add_callback(callback)


@contextlib.contextmanager
def _quiet_experimental():
    # ORPO, CPO and GKD's loss live under trl.experimental, which warns on import; llmtune pins the TRL it runs on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
