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


def training_args(config_class: type, recipe: Recipe, output_dir: Path, **fields):
    """`config_class` (a TrainingArguments subclass) with the recipe's training settings and `fields` on top."""
    import torch

    t = recipe.training
    return config_class(
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
        # The model is already in the recipe's dtype; TRL's default bf16 autocast would change the numbers.
        bf16=False,
        fp16=False,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # training.py rotates checkpoints itself, after each is complete
        eval_strategy="no",
        # TensorBoard is attached below with a fixed directory; other trackers are passed through.
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without use_cpu, a CPU-only machine under torchrun trains one independent copy per process.
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        **fields,
    )


def build_sft(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> Trainer:
    from trl import SFTConfig, SFTTrainer

    args = training_args(
        SFTConfig,
        recipe,
        output_dir,
        # data.py has tokenized, masked and length-limited every row; TRL must not truncate again. Packing
        # needs the pack length; rows are already within it, so best-fit packing keeps every row whole.
        max_length=recipe.data.max_length if recipe.data.packing else None,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        eval_packing=False,
    )
    return _trainer(SFTTrainer, args, recipe, model, tokenizer, data, output_dir, callbacks)


def _trainer(trainer_class, args, recipe, model, tokenizer, data, output_dir, callbacks, **extra) -> Trainer:
    """`trainer_class` built from a builder's arguments (see build_sft) and `args`, with llmtune's guards,
    progress line and logs; `extra` goes to the trainer (e.g. a reference model)."""
    import torch

    # With a cache object present, transformers does not derive per-row attention blocks from the
    # restarting position ids of a pack, and rows would attend to each other. Training needs no cache.
    model.config.use_cache = False
    trainer = guarded(trainer_class)(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    _use_llmtune_logging(trainer, output_dir, tensorboard="tensorboard" in recipe.training.report_to)
    if recipe.method.name == "qlora":
        # TRL casts the trainable weights of a quantized model to bfloat16; keep the recipe's compute dtype so
        # the adapter trains and saves at the precision the run directory promises.
        dtype = getattr(torch, recipe.method.compute_dtype)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    return trainer


def _pretokenized(trainer_class: type[Trainer]) -> type[Trainer]:
    """`trainer_class` taking data.py's token ids as they are: TRL would otherwise render and tokenize again."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset

    return type(trainer_class.__name__, (trainer_class,), {"_prepare_dataset": _prepare_dataset})


def _reference_model(recipe: Recipe, model: PreTrainedModel) -> PreTrainedModel | None:
    """The frozen reference policy: None for an adapter (TRL switches the adapter off, no second copy);
    otherwise a second copy of the base model, loaded the way the policy was (also for tiny: and builtin: models,
    which TRL could not reload by name)."""
    from peft import PeftModel

    from llmtune.models import load_base_model

    if isinstance(model, PeftModel):
        return None
    reference = load_base_model(recipe)
    reference.requires_grad_(False)
    return reference.eval()


def build_dpo(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> Trainer:
    from trl import DPOConfig, DPOTrainer

    objective = recipe.objective
    args = training_args(
        DPOConfig,
        recipe,
        output_dir,
        beta=objective.beta,
        loss_type=[objective.loss_type],
        max_length=None,  # data.py has cut every pair to data.max_length
    )
    reference = _reference_model(recipe, model)
    return _trainer(
        _pretokenized(DPOTrainer), args, recipe, model, tokenizer, data, output_dir, callbacks, ref_model=reference
    )


OBJECTIVES: dict[str, Callable] = {
    "sft": build_sft,
    "dpo": build_dpo,
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
