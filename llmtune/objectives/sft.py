"""Supervised fine-tuning: one tokenized row per sample, the loss on its response (or every token)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import trl
from transformers import Trainer

from llmtune.accel.loss import TargetedLoss
from llmtune.data import PreparedData, encode_dataset, encode_splits
from llmtune.objectives.base import _trainer, training_args
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from llmtune.accel import SpeedPlan


def prepare_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Each sample tokenized and masked as objective.loss_on says (also distill's and seq2seq's data)."""
    return encode_splits(recipe, tokenizer, encode_dataset, recipe.objective.loss_on)


def build_sft(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    plan: SpeedPlan,
) -> Trainer:
    from trl import SFTConfig

    t = recipe.training
    args = training_args(
        SFTConfig,
        recipe,
        plan,
        output_dir,
        # data.py has tokenized, masked and length-limited every row; TRL must not truncate again. Packing
        # needs the pack length; rows are already within it, so best-fit packing keeps every row whole.
        max_length=recipe.data.max_length if recipe.data.packing else None,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        padding_free=plan.padding_free,
        eval_packing=False,
        # A pack is one row already; grouping packs by length would only reorder them.
        train_sampling_strategy="group_by_length" if t.group_by_length and not recipe.data.packing else "random",
    )
    return _trainer(SFTTrainer, args, recipe, model, tokenizer, data, output_dir, callbacks)


class _TargetedSFTTrainer(trl.SFTTrainer):
    """SFTTrainer whose training loss comes from `llmtune.accel.loss.TargetedLoss` when the speed plan has one."""

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


class SFTTrainer(GuardedTrainerMixin, _TargetedSFTTrainer):
    """TRL's SFTTrainer with llmtune's checkpoints and guards; the guard is mixed in above the targeted loss so it
    checks the loss that class computes."""
