"""The objective registry: recipe `objective.name` -> its family's data preparation, trainer and scoring.

One module per family holds those three (see base.Objective); TRL is imported by the family modules only, so
TRL's moving API stays in this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtune.evaluation import score_responses
from llmtune.objectives import (
    classify,
    denoising,
    distill,
    grpo,
    lm,
    ppo,
    preference,
    seq2seq,
    sft,
    token_classify,
)
from llmtune.objectives.base import Objective

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from llmtune.data import PreparedData
    from llmtune.recipe import Recipe

OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(sft.prepare_rows, sft.build_sft, score_responses),
    # Continued pretraining is SFT over text blocks whose every token is a label.
    "lm": Objective(lm.prepare_blocks, sft.build_sft, lm.score_lm),
    "classify": Objective(classify.prepare_classification, classify.build_classify, classify.score_classify),
    "token-classify": Objective(
        token_classify.prepare_tagged, token_classify.build_token_classify, token_classify.score_token_classify
    ),
    "distill": Objective(sft.prepare_rows, distill.build_distill, score_responses),
    "seq2seq": Objective(sft.prepare_rows, seq2seq.build_seq2seq, score_responses),
    "dpo": Objective(preference.prepare_pairs, preference.build_dpo, preference.score_preferences),
    "orpo": Objective(preference.prepare_pairs, preference.build_orpo, preference.score_preferences),
    "simpo": Objective(preference.prepare_pairs, preference.build_simpo, preference.score_preferences),
    "kto": Objective(preference.prepare_pairs, preference.build_kto, preference.score_preferences),
    "grpo": Objective(grpo.prepare_prompts, grpo.build_grpo, grpo.score_rewarded),
    "rloo": Objective(grpo.prepare_prompts, grpo.build_rloo, grpo.score_rewarded),
    "ppo": Objective(grpo.prepare_prompts, ppo.build_ppo, grpo.score_rewarded),
    "reward-model": Objective(preference.prepare_pairs, preference.build_reward_model, preference.score_preferences),
    "mlm": Objective(denoising.prepare_denoising, denoising.build_denoising, denoising.score_denoising),
    "span-corruption": Objective(denoising.prepare_denoising, denoising.build_denoising, denoising.score_denoising),
}


def prepare_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """The recipe's training and held-out data, tokenized in the shape its objective trains on."""
    return OBJECTIVES[recipe.objective.name].prepare(recipe, tokenizer)
