"""Encoder-decoder training (T5 family): the source goes to the encoder, the loss is on the decoder's target.

Its data is sft.prepare_rows with objective.loss_on 'target'; it is scored as SFT is (perplexity, generation).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from transformers import Trainer

from llmtune.errors import LLMTuneError
from llmtune.objectives.base import _rows_trainer
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from llmtune.accel import SpeedPlan
    from llmtune.data import PreparedData


class Seq2SeqTrainer(GuardedTrainerMixin, Trainer):
    """A plain Trainer, not transformers' Seq2SeqTrainer: the latter only adds generation inside `evaluate`, and
    llmtune's eval generates and scores (BLEU, ROUGE, exact match) from the run directory instead."""


def build_seq2seq(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    plan: SpeedPlan,
) -> Trainer:
    """Encoder-decoder training on data.py's (source, target) rows with the model's own cross-entropy."""
    if not getattr(model.config, "is_encoder_decoder", False):
        raise LLMTuneError(
            f"objective seq2seq: model {recipe.model!r} is not an encoder-decoder; use a T5-family model or tiny:t5"
        )
    trainer = _rows_trainer(Seq2SeqTrainer, recipe, model, tokenizer, data, output_dir, callbacks, plan)
    # T5 and BART take **kwargs but return a plain mean loss, ignoring num_items_in_batch; left True, the Trainer
    # would not divide that loss by grad_accum and the accumulated gradient and logged loss would be grad_accum x.
    trainer.model_accepts_loss_kwargs = False
    return trainer
