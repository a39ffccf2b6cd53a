"""The objective registry: recipe `objective.name` -> trainer builder.

This is the only module that imports trl, so TRL's moving API stays in one file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.recipe import Recipe
from llmtune.training import guarded

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback

    from llmtune.data import PreparedData


def check_engines(recipe: Recipe) -> None:
    """Refuse sharding settings this launch cannot honour, before any model loads."""
    import importlib.util
    import os

    from llmtune.errors import LLMTuneError

    t = recipe.training
    if (t.fsdp or t.deepspeed) and "RANK" not in os.environ:
        raise LLMTuneError(
            "training.fsdp / training.deepspeed shard across processes: launch with --nproc N, torchrun or "
            "accelerate launch"
        )
    if t.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise LLMTuneError("training.deepspeed needs the deepspeed package: pip install deepspeed")


def build_sft(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> Trainer:
    import torch
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        **_training_arguments(
            recipe,
            output_dir,
            # data.py has tokenized, masked and length-limited every row; TRL must not truncate again. Packing
            # needs the pack length; rows are already within it, so best-fit packing keeps every row whole.
            max_length=recipe.data.max_length if recipe.data.packing else None,
            packing=recipe.data.packing,
            packing_strategy="bfd",
            eval_packing=False,
        )
    )
    # With a cache object present, transformers does not derive per-row attention blocks from the
    # restarting position ids of a pack, and rows would attend to each other. Training needs no cache.
    model.config.use_cache = False
    trainer = guarded(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    _use_llmtune_logging(trainer, output_dir, tensorboard="tensorboard" in recipe.training.report_to)
    if recipe.method.name == "qlora":
        # SFTTrainer casts the trainable weights of a quantized model to bfloat16; keep the recipe's compute
        # dtype so the adapter trains and saves at the precision the run directory promises.
        dtype = getattr(torch, recipe.method.compute_dtype)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    return trainer


def build_classify(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> Trainer:
    """Sequence classification with transformers' Trainer: cross-entropy of the head's logits on the label."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = TrainingArguments(**_training_arguments(recipe, output_dir))
    model.config.use_cache = False  # a decoder classifier needs no KV cache to train; run.py turns it back on
    trainer = guarded(Trainer)(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=callbacks,
    )
    _use_llmtune_logging(trainer, output_dir, tensorboard="tensorboard" in recipe.training.report_to)
    return trainer


def _training_arguments(recipe: Recipe, output_dir: Path, **overrides) -> dict:
    """TrainingArguments fields every objective shares (steps, optimizer, seeds, checkpoints, logging, device);
    `overrides` adds or replaces fields of a trainer's own config class (e.g. SFTConfig's packing)."""
    import torch

    t = recipe.training
    fields = dict(
        output_dir=str(output_dir),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs or 1.0,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=recipe.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        # Sharding engines are accelerate's; the recipe only names their settings.
        fsdp=True if t.fsdp else None,
        fsdp_config=t.fsdp_config or None,
        deepspeed=t.deepspeed,
        # The model is already in the recipe's dtype; a default bf16 autocast would change the numbers.
        bf16=False,
        fp16=False,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # training.py rotates checkpoints itself, after each is complete
        eval_strategy="no",
        # TensorBoard is attached by _use_llmtune_logging with a fixed directory; other trackers are passed through.
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without use_cpu, a CPU-only machine under torchrun trains one independent copy per process.
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    return {**fields, **overrides}


OBJECTIVES: dict[str, Callable] = {
    "sft": build_sft,
    # Continued pretraining is SFT over text blocks whose every token is a label (see data.prepare_blocks).
    "lm": build_sft,
    "classify": build_classify,
}


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
