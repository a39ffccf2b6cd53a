"""The objective registry: recipe `objective.name` -> trainer builder.

This is the only module that imports trl, so TRL's moving API stays in one file.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from llmtune.errors import LLMTuneError
from llmtune.recipe import Recipe
from llmtune.training import guarded

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from llmtune.data import PreparedData


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


def build_sft(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> Trainer:
    from trl import SFTConfig, SFTTrainer

    t = recipe.training
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
    _use_llmtune_logging(trainer, output_dir, tensorboard="tensorboard" in t.report_to)
    if recipe.method.name == "qlora":
        # SFTTrainer casts the trainable weights of a quantized model to bfloat16; keep the recipe's compute
        # dtype so the adapter trains and saves at the precision the run directory promises.
        dtype = getattr(torch, recipe.method.compute_dtype)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    return trainer


def _training_arguments(recipe: Recipe, output_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments every objective's TrainingArguments (or TRL config) takes from the recipe."""
    t = recipe.training
    arguments = dict(
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
        # TensorBoard is attached by _use_llmtune_logging with a fixed directory; other trackers pass through.
        report_to=[r for r in t.report_to if r != "tensorboard"] or "none",
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without use_cpu, a CPU-only machine under torchrun trains one independent copy per process.
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    arguments.update(overrides)
    return arguments


def build_distill(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> Trainer:
    """Knowledge distillation on the recipe's own tokenized, response-masked rows.

    TRL's DistillationTrainer generates completions on-policy from prompt/completion text and has no data
    cross-entropy term; GKD's trainer re-tokenizes through SFTTrainer. Neither takes our masked rows with an
    `alpha` mix, so a small Trainer subclass computes the loss, reusing TRL's generalised JSD for the divergence.
    """

    from llmtune.models import check_same_tokenizer, load_teacher, load_tokenizer

    spec = recipe.objective
    check_same_tokenizer(tokenizer, load_tokenizer(spec.teacher), spec.teacher)
    teacher = load_teacher(spec.teacher, recipe.training.dtype)
    sizes = (model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    if sizes[0] != sizes[1]:
        raise LLMTuneError(
            f"objective.teacher {spec.teacher!r}: its output head has {sizes[1]} logits per token and the student's "
            f"{sizes[0]}; distillation needs one vocabulary"
        )
    return _build_trainer(
        _DistillationTrainer, recipe, model, tokenizer, data, output_dir, callbacks, teacher=teacher, spec=spec
    )


def build_seq2seq(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> Trainer:
    """Encoder-decoder training on data.py's (source, target) rows with the model's own cross-entropy.

    A plain Trainer, not Seq2SeqTrainer: the latter only adds generation inside `evaluate`, and llmtune's
    eval generates and scores (BLEU, ROUGE, exact match) from the run directory instead.
    """
    if not getattr(model.config, "is_encoder_decoder", False):
        raise LLMTuneError(
            f"objective seq2seq: model {recipe.model!r} is not an encoder-decoder; use a T5-family model or tiny:t5"
        )
    trainer = _build_trainer(Trainer, recipe, model, tokenizer, data, output_dir, callbacks)
    # T5 and BART take **kwargs but return a plain mean loss, ignoring num_items_in_batch; left True, the Trainer
    # would not divide that loss by grad_accum and the accumulated gradient and logged loss would be grad_accum x.
    trainer.model_accepts_loss_kwargs = False
    return trainer


def _build_trainer(
    trainer_class: type[Trainer],
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    **extra: Any,
) -> Trainer:
    """A guarded transformers Trainer over data.py's tokenized rows, padded per batch; `extra` goes to its init."""
    from transformers import TrainingArguments

    args = TrainingArguments(**_training_arguments(recipe, output_dir, remove_unused_columns=False))
    model.config.use_cache = False
    trainer = guarded(trainer_class)(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        # An encoder-decoder builds its decoder inputs from these labels (shifted right, -100 read as padding).
        data_collator=_pad_rows(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    _use_llmtune_logging(trainer, output_dir, tensorboard="tensorboard" in recipe.training.report_to)
    return trainer


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    beta: float,
    num_items: torch.Tensor | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha * CE(labels) + (1 - alpha) * T^2 * divergence(teacher, student), over the tokens that carry loss.

    Position t predicts label t+1. Both terms are sums over loss-bearing tokens divided by `num_items` (the
    Trainer's count over the whole accumulated batch) or, without it, by this batch's count. beta 0 gives forward
    KL(teacher || student), 1 reverse KL, anything between TRL's generalised JSD. T^2 keeps the divergence's
    gradients on the same scale as the cross-entropy's when the temperature changes (Hinton et al.).

    Returns:
        The loss, and its cross-entropy and divergence parts (detached) for logging.
    """
    import torch.nn.functional as F

    with _quiet_experimental():
        from trl.experimental.gkd import GKDTrainer

    from llmtune.data import IGNORE_INDEX

    # Prompt tuning puts logits for its virtual tokens first; the labels cover the real tokens only.
    student = student_logits[:, -labels.size(1) :][:, :-1].float()
    teacher = teacher_logits[:, :-1].float()
    target = labels[:, 1:]
    n = num_items if num_items is not None else (target != IGNORE_INDEX).sum().clamp(min=1)
    ce = (
        F.cross_entropy(
            student.reshape(-1, student.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        / n
    )
    divergence = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=target, beta=beta, temperature=temperature, num_items_in_batch=n
    )
    loss = alpha * ce + (1 - alpha) * temperature**2 * divergence
    return loss, ce.detach(), divergence.detach()


_DIVERGENCE_BETA = {"forward": 0.0, "reverse": 1.0}


class _DistillationTrainer(Trainer):
    def __init__(self, *args: Any, teacher: PreTrainedModel, spec: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device)
        self.spec = spec
        self.beta = _DIVERGENCE_BETA.get(spec.divergence, spec.beta)
        # compute_loss divides by the Trainer's token count over the accumulated batch when it is given.
        self.model_accepts_loss_kwargs = True
        self._parts: dict[str, list[float]] = {"distill_ce": [], "distill_divergence": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        features = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        outputs = model(**features)
        with torch.no_grad():
            teacher_logits = self.teacher(**features).logits
        loss, ce, divergence = distillation_loss(
            outputs.logits,
            teacher_logits,
            inputs["labels"],
            self.spec.temperature,
            self.spec.alpha,
            self.beta,
            num_items_in_batch,
        )
        if model.training:
            self._parts["distill_ce"].append(ce.item())
            self._parts["distill_divergence"].append(divergence.item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts["distill_ce"]:
            # Per-token means over the steps since the last log (per micro-batch, before accumulation).
            for key, values in self._parts.items():
                logs[key] = sum(values) / len(values)
                values.clear()
        super().log(logs, start_time)


def _pad_rows(pad_token_id: int) -> Callable:
    """Right-pad a batch of tokenized rows; padded labels are -100, so padding never carries loss."""
    from llmtune.data import IGNORE_INDEX
    from llmtune.evaluation import pad_batch

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, attention = pad_batch([r["input_ids"] for r in rows], pad_token_id, left=False)
        labels, _ = pad_batch([r["labels"] for r in rows], IGNORE_INDEX, left=False)
        return {"input_ids": ids, "attention_mask": attention, "labels": labels}

    return collate


@contextlib.contextmanager
def _quiet_experimental():
    # GKD's loss lives under trl.experimental, which warns on import; the loss itself is a stable formula.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


OBJECTIVES: dict[str, Callable] = {
    "sft": build_sft,
    "distill": build_distill,
    "seq2seq": build_seq2seq,
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
