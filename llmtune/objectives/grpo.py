"""GRPO and RLOO: the policy generates a group of completions to each prompt and learns from their rewards
(metrics.REWARDS functions and, optionally, a trained reward model), each judged against its group. Their rows are
prompts with reference responses; they are scored as SFT is, on those reference responses. The rewards here are
also PPO's (objectives/ppo.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import trl
from transformers import Trainer
from trl.trainer.utils import add_fused_lm_head

from llmtune.accel import on_device
from llmtune.artifacts import is_run_dir
from llmtune.data import (
    PreparedData,
    Sample,
    encode_splits,
    encode_through_response,
    prompt_reference_dataset,
    prompt_value,
)
from llmtune.errors import LLMTuneError
from llmtune.evaluation import score_responses
from llmtune.metrics import REWARDS
from llmtune.models import auto_class, load_tokenizer, load_tuned
from llmtune.objectives.base import _reference_model, _trainer, training_args
from llmtune.objectives.preference import sequence_rewards
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def prepare_prompts(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Prompts and their reference responses: the policy generates its own completions."""
    return encode_splits(recipe, tokenizer, prompt_reference_dataset)


class _AdapterOffReference:
    """A TRL online trainer whose KL reference is the policy with its adapter switched off, or, for full
    fine-tuning, the frozen copy passed as `ref_model`.

    Given a PeftModel, TRL copies the adapter as a second, "ref" adapter (GRPO with a KL weight, RLOO always),
    which the run's adapter/ would then save beside the trained one; given a plain model, it would load the
    reference by the model's hub name, which tiny: and builtin: models lack. TRL is built with no KL weight, which
    skips the loading, and the copy is deleted; the weight is set afterwards. Without a "ref" adapter or a
    reference model, TRL computes the reference log-probabilities with the adapter switched off.
    """

    def __init__(self, *, args, ref_model=None, **kwargs):
        beta, args.beta = args.beta, 0.0
        super().__init__(args=args, **kwargs)
        args.beta = self.beta = beta
        if "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")
        if beta and ref_model is not None:
            # As TRL prepares its own reference: the same fused head (log-probabilities without full logits).
            add_fused_lm_head(
                ref_model,
                temperature=self.temperature,
                cast_lm_head_to_fp32=getattr(args, "cast_lm_head_to_fp32", False),
            )
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)


class GRPOTrainer(GuardedTrainerMixin, _AdapterOffReference, trl.GRPOTrainer):
    """TRL's GRPOTrainer with llmtune's checkpoints, guards and reference (see _AdapterOffReference)."""


class RLOOTrainer(GuardedTrainerMixin, _AdapterOffReference, trl.RLOOTrainer):
    """TRL's RLOOTrainer with llmtune's checkpoints, guards and reference (see _AdapterOffReference)."""


def build_grpo(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    return _build_group_trainer(
        GRPOTrainer, trl.GRPOConfig, recipe, model, tokenizer, data, output_dir, callbacks, plan
    )


def build_rloo(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    return _build_group_trainer(
        RLOOTrainer, trl.RLOOConfig, recipe, model, tokenizer, data, output_dir, callbacks, plan
    )


def _build_group_trainer(
    trainer_class, config_class, recipe, model, tokenizer, data, output_dir, callbacks, plan
) -> Trainer:
    objective = recipe.objective
    args = training_args(
        config_class,
        recipe,
        plan,
        output_dir,
        num_generations=objective.num_generations,
        max_completion_length=objective.max_completion_length,
        temperature=objective.temperature,
        reward_weights=objective.reward_weights,
        beta=objective.beta,
    )
    return online_trainer(trainer_class, args, recipe, model, tokenizer, data, output_dir, callbacks, objective.beta)


def online_trainer(
    trainer_class, args, recipe, model, tokenizer, data, output_dir, callbacks, kl_weight: float, **extra
) -> Trainer:
    """A trainer that samples its own completions (grpo, rloo, ppo): the objective's rewards as `reward_funcs`,
    the reference as `ref_model` and `extra` go to its init."""
    # A full fine-tuning reference is a second copy of the model: loaded only when the KL term needs it.
    reference = _reference_model(recipe, model, tokenizer) if kl_weight else None
    # TRL evaluates by generating; `llmtune eval` scores the held-out prompts instead.
    return _trainer(
        trainer_class,
        args,
        recipe,
        model,
        tokenizer,
        replace(data, eval=None),
        output_dir,
        callbacks,
        reward_funcs=reward_functions(recipe.objective, recipe.eval.batch_size),
        ref_model=reference,
        **extra,
    )


def reward_functions(objective, batch_size: int) -> list:
    """The objective's rewards as TRL calls them, in the order of its reward_weights: the rules, then the reward
    model."""
    rewards = [_reward_function(name) for name in objective.rewards]
    if objective.reward_model is not None:
        rewards.append(_reward_model_function(Path(objective.reward_model), batch_size))
    return rewards


def as_completions(prompts: list, texts: list[str]) -> list:
    """Completion texts as TRL gives them to reward functions: an assistant message after a conversation."""
    return [
        [{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts, strict=True)
    ]


def score_rewarded(model, tokenizer, samples, recipe, teacher=None):
    """score_responses; with objective.reward_model also the mean reward it gives the greedy completions (reward)."""
    results, predictions = score_responses(model, tokenizer, samples, recipe, teacher)
    path = recipe.objective.reward_model
    if path is None or predictions is None:
        return results, predictions
    prompts = [prompt_value(s.prompt_and_reference()[0]) for s in samples]
    scores = _reward_model_function(Path(path), recipe.eval.batch_size)(prompts, as_completions(prompts, predictions))
    results["reward"] = sum(scores) / len(scores)
    return results, predictions


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
    model = on_device(model)
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
