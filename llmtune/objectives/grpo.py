"""GRPO: the policy generates completions to each prompt and learns from their rewards (metrics.REWARDS functions
and, optionally, a trained reward model). Its rows are prompts with reference responses; it is scored as SFT is,
on those reference responses."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import trl
from transformers import Trainer

from llmtune.artifacts import is_run_dir
from llmtune.data import PreparedData, Sample, encode_splits, encode_through_response, prompt_reference_dataset
from llmtune.errors import LLMTuneError
from llmtune.metrics import REWARDS
from llmtune.models import auto_class, load_tokenizer, load_tuned
from llmtune.objectives.base import _trainer, training_args
from llmtune.objectives.preference import sequence_rewards
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def prepare_prompts(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Prompts and their reference responses: the policy generates its own completions."""
    return encode_splits(recipe, tokenizer, prompt_reference_dataset)


class GRPOTrainer(GuardedTrainerMixin, trl.GRPOTrainer):
    """TRL's GRPOTrainer with llmtune's checkpoints and guards."""


def build_grpo(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    objective = recipe.objective
    args = training_args(
        trl.GRPOConfig,
        recipe,
        plan,
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
    score = REWARDS[name]

    def reward(prompts, completions, reference, **columns):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score(texts, reference)

    reward.__name__ = name  # TRL logs rewards/NAME/mean under this name
    return reward


def _reward_model_function(path: Path, batch_size: int):
    """A reward model (run directory or checkpoint) as a TRL reward function. It scores each prompt + completion
    encoded exactly as the reward model was trained on pairs (data.py), which TRL's own scoring would not do."""
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
