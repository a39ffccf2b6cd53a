"""What every objective shares: the interface the registry holds, training arguments from the recipe, the one
way a trainer is built (llmtune's guards, progress line, logs, speed levers) and the frozen reference model."""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from llmtune.attention import attends_per_row, use_segmented_attention
from llmtune.batching import pad_rows
from llmtune.errors import LLMTuneError
from llmtune.fused import fuse_blocks
from llmtune.precision import compact_dropouts, fuse_lora_layers, route_frozen_linears
from llmtune.recipe import FROZEN_BF16_METHODS, PROMPT_LEARNING_METHODS, Recipe
from llmtune.training import use_bf16, use_gradient_checkpointing

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from llmtune.data import PreparedData


@dataclass
class Objective:
    """One recipe `objective.name`: how its data is prepared, its trainer built and a model scored on it.

    prepare(recipe, tokenizer) -> PreparedData
    build_trainer(recipe, model, tokenizer, data, output_dir, callbacks) -> Trainer
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
        gradient_checkpointing=use_gradient_checkpointing(recipe),
        # Sharding engines are accelerate's; the recipe only names their settings.
        fsdp=True if t.fsdp else None,
        fsdp_config=t.fsdp_config or None,
        deepspeed=t.deepspeed,
        # Autocast only as training.bf16 says; TRL would otherwise switch bf16 on by itself.
        bf16=use_bf16(recipe),
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
        **fields,
    )


# Below this share of padding in random batches, rows end to end gain nothing measurable: quickstart's rows
# (3% padding) trained no faster padding-free, and the batches' changing sizes left the process 0.3 GB bigger.
PADDING_FREE_FROM = 0.10


def _padding_free(recipe: Recipe, model: PreTrainedModel, train: Dataset) -> bool:
    """data.padding_free resolved. 'auto' is on where each row attends on its own (see attention.py; through
    another attention implementation transformers masks the whole flattened batch, correct but quadratic in it)
    and random batches of this data would be at least PADDING_FREE_FROM padding."""
    if recipe.data.padding_free != "auto":
        return recipe.data.padding_free
    if recipe.method.name in PROMPT_LEARNING_METHODS or not attends_per_row(model):
        return False
    # A few thousand rows drawn at random estimate the padding without reading every row.
    rows = random.Random(recipe.training.seed).sample(range(len(train)), min(len(train), 4096))
    lengths = [len(ids) for ids in train.select(rows)["input_ids"]]
    return expected_padding(lengths, recipe.training.batch_size, recipe.training.seed) >= PADDING_FREE_FROM


def expected_padding(lengths: list[int], batch_size: int, seed: int, batches: int = 256) -> float:
    """The share of padding in `batches` batches of rows drawn at random, each padded to its longest row."""
    rng = random.Random(seed)
    real = padded = 0
    for _ in range(batches):
        batch = rng.sample(lengths, min(batch_size, len(lengths)))
        real, padded = real + sum(batch), padded + len(batch) * max(batch)
    return 1 - real / padded if padded else 0.0


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
    _use_llmtune_logging(trainer, output_dir, tensorboard="tensorboard" in recipe.training.report_to)
    _apply_speed_levers(trainer, recipe, model, args)
    return trainer


def _apply_speed_levers(trainer: Trainer, recipe: Recipe, model: PreTrainedModel, args: Any) -> None:
    t = recipe.training
    store = torch.bfloat16 if _frozen_bf16(recipe) else None
    # Sharding engines own the weights outside the forward pass, so layers keep their own forward there.
    sharded = t.fsdp or t.deepspeed
    compact = t.compact_dropout and not torch.cuda.is_available()  # CUDA's fused dropout keeps a boolean mask
    if args.bf16 and not sharded and (not torch.cuda.is_available() if t.fused_lora == "auto" else t.fused_lora):
        fuse_lora_layers(model, t.recast_frozen, t.full_precision_outputs, compact_masks=compact)
    if args.bf16 and (t.recast_frozen or t.full_precision_outputs or store) and not sharded:
        route_frozen_linears(model, t.recast_frozen, t.full_precision_outputs, store_dtype=store)
    if compact:
        compact_dropouts(model)
    # CUDA's bf16 attention kernels are the fast ones.
    use_segmented_attention(model, float32=args.bf16 and t.cpu_float32_attention and not torch.cuda.is_available())
    if recipe.method.name == "qlora":
        # TRL casts the trainable weights of a quantized model to bfloat16; keep the recipe's compute dtype so
        # the adapter trains and saves at the precision the run directory promises.
        dtype = getattr(torch, recipe.method.compute_dtype)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    if t.fused_blocks and not sharded:  # last: its check runs each block as it will train
        fuse_blocks(model)


def _frozen_bf16(recipe: Recipe) -> bool:
    """training.frozen_bf16 resolved. 'auto' is on where the weights live in GPU memory: on the CPU the model's
    float32 weights are pages of the checkpoint file, mapped and resident whatever is done with them, and bf16
    copies would only add to them."""
    wanted = recipe.training.frozen_bf16
    return (torch.cuda.is_available() if wanted == "auto" else wanted) and _saves_no_frozen_weights(recipe)


def _saves_no_frozen_weights(recipe: Recipe) -> bool:
    """Whether the run saves its adapter alone and never runs its model outside autocast while training (grpo
    generates between steps)."""
    return recipe.method.name in FROZEN_BF16_METHODS and recipe.objective.name != "grpo"


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


def _rows_trainer(
    trainer_class: type[Trainer],
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    **extra: Any,
) -> Trainer:
    """A transformers Trainer over data.py's tokenized rows, padded per batch; `extra` goes to its init."""
    from transformers import TrainingArguments

    args = training_args(TrainingArguments, recipe, output_dir, remove_unused_columns=False)
    # An encoder-decoder builds its decoder inputs from these labels (shifted right, -100 read as padding).
    collator = pad_rows(tokenizer.pad_token_id)
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
