"""The objective registry: recipe `objective.name` -> trainer builder.

This is the only module that imports trl, so TRL's moving API stays in one file.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from llmtune.attention import attends_per_row, use_segmented_attention
from llmtune.batching import pad_rows
from llmtune.data import IGNORE_INDEX
from llmtune.errors import LLMTuneError
from llmtune.fused import fuse_blocks
from llmtune.loss import TargetedLoss
from llmtune.precision import compact_dropouts, fuse_lora_layers, route_frozen_linears
from llmtune.recipe import FROZEN_BF16_METHODS, PROMPT_LEARNING_METHODS, Recipe
from llmtune.training import guarded, use_bf16, use_gradient_checkpointing

if TYPE_CHECKING:
    from datasets import Dataset
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


def build_sft(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
) -> Trainer:
    from trl import SFTConfig

    t = recipe.training
    args = training_args(
        SFTConfig,
        recipe,
        output_dir,
        # data.py has tokenized, masked and length-limited every row; TRL must not truncate again. Packing
        # needs the pack length; rows are already within it, so best-fit packing keeps every row whole.
        max_length=recipe.data.max_length if recipe.data.packing else None,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        padding_free=_padding_free(recipe, model, data.train),
        eval_packing=False,
        # A pack is one row already; grouping packs by length would only reorder them.
        train_sampling_strategy="group_by_length" if t.group_by_length and not recipe.data.packing else "random",
    )
    trainer = _trainer(_sft_trainer_class(), args, recipe, model, tokenizer, data, output_dir, callbacks)
    # Sharding engines own the head's weight outside their forward pass, so the head stays inside it there.
    if t.fused_loss and not (t.fsdp or t.deepspeed) and model.get_output_embeddings() is not None:
        trainer.llmtune_loss = TargetedLoss(model)
    return trainer


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
    return trainer


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


def build_classify(recipe, model, tokenizer, data, output_dir, callbacks) -> Trainer:
    """Sequence classification with transformers' Trainer: cross-entropy of the head's logits on the label."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = training_args(TrainingArguments, recipe, output_dir)
    return _trainer(
        Trainer,
        args,
        recipe,
        model,
        tokenizer,
        data,
        output_dir,
        callbacks,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def _sft_trainer_class() -> type[Trainer]:
    import torch
    from trl import SFTTrainer

    class LLMTuneSFTTrainer(SFTTrainer):
        """SFTTrainer whose training loss comes from `llmtune.loss.TargetedLoss` when one is set."""

        llmtune_loss: TargetedLoss | None = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.llmtune_loss is None or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = self.llmtune_loss(model, inputs, num_items_in_batch)
            # As in SFTTrainer: num_items_in_batch counts every rank's tokens, and DDP averages the gradients.
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            if model.training:
                # The token count behind the progress bar's tokens/s, as SFTTrainer keeps it.
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
                self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item()
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return LLMTuneSFTTrainer


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


# The builders below take the same arguments as build_sft.


def build_dpo(recipe, model, tokenizer, data, output_dir, callbacks) -> Trainer:
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


def build_orpo(recipe, model, tokenizer, data, output_dir, callbacks) -> Trainer:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    args = training_args(ORPOConfig, recipe, output_dir, beta=recipe.objective.beta)
    return _trainer(_from_pair_ids(ORPOTrainer), args, recipe, model, tokenizer, data, output_dir, callbacks)


def build_simpo(recipe, model, tokenizer, data, output_dir, callbacks) -> Trainer:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    objective = recipe.objective
    # SimPO is CPO's "simpo" loss without CPO's behaviour-cloning term (cpo_alpha = 0).
    args = training_args(
        CPOConfig,
        recipe,
        output_dir,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=objective.beta,
        simpo_gamma=objective.gamma,
    )
    return _trainer(_from_pair_ids(CPOTrainer), args, recipe, model, tokenizer, data, output_dir, callbacks)


def build_kto(recipe, model, tokenizer, data, output_dir, callbacks) -> Trainer:
    from trl import KTOConfig, KTOTrainer

    objective = recipe.objective
    args = training_args(
        KTOConfig,
        recipe,
        output_dir,
        beta=objective.beta,
        desirable_weight=objective.desirable_weight,
        undesirable_weight=objective.undesirable_weight,
        loss_type=objective.loss_type,
        max_length=None,  # data.py has cut every pair to data.max_length
        # The KL estimate pairs each row with the previous row's completion, fixed when the data is prepared.
        train_sampling_strategy="sequential" if objective.loss_type == "kto" else "random",
    )
    seed = recipe.training.seed
    unpaired = replace(
        data, train=_unpaired(data.train, seed), eval=_unpaired(data.eval, seed) if data.eval is not None else None
    )
    reference = _reference_model(recipe, model)
    return _trainer(
        _unpaired_kto(KTOTrainer), args, recipe, model, tokenizer, unpaired, output_dir, callbacks, ref_model=reference
    )


def _from_pair_ids(trainer_class: type[Trainer]) -> type[Trainer]:
    """ORPO / CPO (trl.experimental) tokenizing rows from data.py's prompt / chosen / rejected ids."""

    def tokenize_row(self, feature, model=None):
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            response = feature[f"{side}_ids"]
            row[f"{side}_input_ids"] = prompt + response
            row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(response))
            row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + response
        return row

    return type(trainer_class.__name__, (trainer_class,), {"tokenize_row": tokenize_row})


def _unpaired(pairs: Dataset, seed: int) -> Dataset:
    """Each pair as two KTO rows (chosen: label True, rejected: False), in a fixed shuffled order so a batch
    mixes both labels and neighbours rarely share a prompt (KTO's KL estimate needs mismatched neighbours)."""
    import random

    from datasets import Dataset

    rows = [
        (prompt, response, side == "chosen_ids")
        for side in ("chosen_ids", "rejected_ids")
        for prompt, response in zip(pairs["prompt_ids"], pairs[side], strict=True)
    ]
    random.Random(seed).shuffle(rows)
    prompts, completions, labels = zip(*rows, strict=True)
    return Dataset.from_dict({"prompt_ids": prompts, "completion_ids": completions, "label": labels})


def _unpaired_kto(trainer_class: type[Trainer]) -> type[Trainer]:
    """KTO over data.py's unpaired token ids; adds the mismatched completions its KL estimate needs as TRL does:
    within each batch, every row borrows the previous row's completion."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset

        def rotate(batch):
            return {"KL_completion_ids": [batch["completion_ids"][-1], *batch["completion_ids"][:-1]]}

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)

    return type(trainer_class.__name__, (trainer_class,), {"_prepare_dataset": _prepare_dataset})


def build_grpo(recipe, model, tokenizer, data, output_dir, callbacks) -> Trainer:
    from trl import GRPOConfig, GRPOTrainer

    objective = recipe.objective
    args = training_args(
        GRPOConfig,
        recipe,
        output_dir,
        num_generations=objective.num_generations,
        max_completion_length=objective.max_completion_length,
        temperature=objective.temperature,
        reward_weights=objective.reward_weights,
        beta=0.0,  # no KL term: no reference model in memory (TRL's default, after DAPO / Dr. GRPO)
    )
    rewards = [_reward_function(name) for name in objective.rewards]
    if objective.reward_model is not None:
        rewards.append(_reward_model_function(Path(objective.reward_model), recipe.eval.batch_size))
    # TRL evaluates by generating; `llmtune eval` scores the held-out prompts instead.
    return _trainer(
        GRPOTrainer,
        args,
        recipe,
        model,
        tokenizer,
        replace(data, eval=None),
        output_dir,
        callbacks,
        reward_funcs=rewards,
    )


def _reward_function(name: str):
    """A metrics.REWARDS function as TRL calls it: completions (text or assistant messages) and dataset columns."""
    from llmtune.metrics import REWARDS

    score = REWARDS[name]

    def reward(prompts, completions, reference, **columns):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score(texts, reference)

    reward.__name__ = name  # TRL logs rewards/NAME/mean under this name
    return reward


def build_reward_model(recipe, model, tokenizer, data, output_dir, callbacks) -> Trainer:
    from trl import RewardConfig, RewardTrainer

    args = training_args(
        RewardConfig,
        recipe,
        output_dir,
        center_rewards_coefficient=recipe.objective.center_rewards,
        max_length=None,  # data.py has cut every pair to data.max_length
    )
    # The reward head reads whole sequences: prompt followed by each response.
    sequences = replace(data, train=_whole_sequences(data.train), eval=_whole_sequences(data.eval))
    return _trainer(RewardTrainer, args, recipe, model, tokenizer, sequences, output_dir, callbacks)


def _whole_sequences(pairs: Dataset | None) -> Dataset | None:
    if pairs is None:
        return None

    def join(row):
        return {side: row["prompt_ids"] + row[side] for side in ("chosen_ids", "rejected_ids")}

    return pairs.map(join, remove_columns=["prompt_ids"])


def _reward_model_function(path: Path, batch_size: int):
    """A reward model (run directory or checkpoint) as a TRL reward function. It scores each prompt + completion
    encoded exactly as the reward model was trained on pairs (data.py), which TRL's own scoring would not do."""
    import torch

    from llmtune.artifacts import is_run_dir
    from llmtune.data import Sample, encode_through_response
    from llmtune.errors import LLMTuneError
    from llmtune.evaluation import sequence_rewards
    from llmtune.models import auto_class, load_tokenizer, load_tuned

    if is_run_dir(path):
        model, tokenizer = load_tuned(path)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
    else:
        model, tokenizer = auto_class("sequence-classification").from_pretrained(path), load_tokenizer(str(path))
    if getattr(model.config, "num_labels", None) != 1:
        raise LLMTuneError(
            f"{path}: objective.reward_model must give one score per sequence (a reward-model run or a "
            f"sequence-classification checkpoint with num_labels=1); it has {model.config.num_labels} labels"
        )
    model.requires_grad_(False)

    def reward_model(prompts, completions, **columns):
        samples = [
            Sample(messages=[*p, *c]) if isinstance(p, list) else Sample(segments=[(p, False), (c, True)])
            for p, c in zip(prompts, completions, strict=True)
        ]
        with torch.no_grad():
            return sequence_rewards(
                model, tokenizer, [encode_through_response(s, tokenizer) for s in samples], batch_size
            )

    return reward_model


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
    """A transformers Trainer over data.py's tokenized rows, padded per batch; `extra` goes to its init."""
    from transformers import TrainingArguments

    args = training_args(TrainingArguments, recipe, output_dir, remove_unused_columns=False)
    # An encoder-decoder builds its decoder inputs from these labels (shifted right, -100 read as padding).
    collator = pad_rows(tokenizer.pad_token_id)
    return _trainer(
        trainer_class, args, recipe, model, tokenizer, data, output_dir, callbacks, data_collator=collator, **extra
    )


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


@contextlib.contextmanager
def _quiet_experimental():
    # GKD's loss lives under trl.experimental, which warns on import; the loss itself is a stable formula.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


OBJECTIVES: dict[str, Callable] = {
    "sft": build_sft,
    # Continued pretraining is SFT over text blocks whose every token is a label (see data.prepare_blocks).
    "lm": build_sft,
    "classify": build_classify,
    "distill": build_distill,
    "seq2seq": build_seq2seq,
    "dpo": build_dpo,
    "orpo": build_orpo,
    "simpo": build_simpo,
    "kto": build_kto,
    "grpo": build_grpo,
    "reward-model": build_reward_model,
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
