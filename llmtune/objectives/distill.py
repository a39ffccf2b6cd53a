"""Knowledge distillation: a student trained on the recipe's masked rows towards a frozen teacher's distribution.

Its data is sft.prepare_rows; it is scored as SFT is, with KL(teacher || model) beside (see evaluation.evaluate).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer

from llmtune.data import IGNORE_INDEX
from llmtune.errors import LLMTuneError
from llmtune.objectives.base import _quiet_experimental, _rows_trainer
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from llmtune.accel import SpeedPlan
    from llmtune.data import PreparedData


def build_distill(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    plan: SpeedPlan,
) -> Trainer:
    """Knowledge distillation on the recipe's own tokenized, response-masked rows.

    TRL's DistillationTrainer generates completions on-policy from prompt/completion text and has no data
    cross-entropy term; GKD's trainer re-tokenizes through SFTTrainer. Neither takes our masked rows with an
    `alpha` mix, so a small Trainer subclass computes the loss, reusing TRL's generalised JSD for the divergence.
    """

    from llmtune.models import check_same_tokenizer, load_teacher, load_tokenizer, options_for

    spec = recipe.objective
    options = options_for(recipe, spec.teacher)
    check_same_tokenizer(tokenizer, load_tokenizer(spec.teacher, options), spec.teacher)
    teacher = load_teacher(spec.teacher, recipe.training.dtype, options)
    sizes = (model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    if sizes[0] != sizes[1]:
        raise LLMTuneError(
            f"objective.teacher {spec.teacher!r}: its output head has {sizes[1]} logits per token and the student's "
            f"{sizes[0]}; distillation needs one vocabulary"
        )
    return _rows_trainer(
        DistillationTrainer, recipe, model, tokenizer, data, output_dir, callbacks, plan, teacher=teacher, spec=spec
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


class _DistillationLossTrainer(Trainer):
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


class DistillationTrainer(GuardedTrainerMixin, _DistillationLossTrainer):
    """The distillation loss with llmtune's checkpoints and guards; the guard is mixed in above the loss so it
    checks the loss that class computes."""
