"""Preference objectives: dpo, orpo, simpo and kto tune a policy on (prompt, chosen, rejected) pairs; reward-model
trains a scalar head to score the chosen response above the rejected one."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import trl
from transformers import Trainer

from llmtune import metrics, progress
from llmtune.batching import padded_batches
from llmtune.data import IGNORE_INDEX, PreferenceSample, PreparedData, encode_preference_dataset, encode_splits
from llmtune.evaluation import sequence_logps
from llmtune.objectives.base import _quiet_experimental, _reference_model, _trainer, training_args
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

with _quiet_experimental():
    from trl.experimental import cpo, orpo

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def prepare_pairs(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Each pair as prompt_ids / chosen_ids / rejected_ids."""
    return encode_splits(recipe, tokenizer, encode_preference_dataset)


class DPOTrainer(GuardedTrainerMixin, trl.DPOTrainer):
    """DPO taking data.py's token ids as they are: TRL would otherwise render and tokenize again."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset


def _tokenize_pair_ids(self, feature, model=None):
    """ORPO's and CPO's (trl.experimental) row from data.py's prompt / chosen / rejected ids."""
    prompt = feature["prompt_ids"]
    row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
    for side in ("chosen", "rejected"):
        response = feature[f"{side}_ids"]
        row[f"{side}_input_ids"] = prompt + response
        row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(response))
        row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + response
    return row


class ORPOTrainer(GuardedTrainerMixin, orpo.ORPOTrainer):
    """ORPO tokenizing rows from data.py's pair ids."""

    tokenize_row = _tokenize_pair_ids


class CPOTrainer(GuardedTrainerMixin, cpo.CPOTrainer):
    """CPO tokenizing rows from data.py's pair ids; SimPO's trainer (see build_simpo)."""

    tokenize_row = _tokenize_pair_ids


class KTOTrainer(GuardedTrainerMixin, trl.KTOTrainer):
    """KTO over data.py's unpaired token ids; adds the mismatched completions its KL estimate needs as TRL does:
    within each batch, every row borrows the previous row's completion."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset

        def rotate(batch):
            return {"KL_completion_ids": [batch["completion_ids"][-1], *batch["completion_ids"][:-1]]}

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


class RewardTrainer(GuardedTrainerMixin, trl.RewardTrainer):
    """TRL's RewardTrainer with llmtune's checkpoints and guards, over whole sequences (see build_reward_model)."""


# The builders below take the same arguments as sft.build_sft.


def build_dpo(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    objective = recipe.objective
    args = training_args(
        trl.DPOConfig,
        recipe,
        plan,
        output_dir,
        beta=objective.beta,
        loss_type=[objective.loss_type],
        max_length=None,  # data.py has cut every pair to data.max_length
    )
    reference = _reference_model(recipe, model, tokenizer)
    return _trainer(DPOTrainer, args, recipe, model, tokenizer, data, output_dir, callbacks, ref_model=reference)


def build_orpo(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    args = training_args(orpo.ORPOConfig, recipe, plan, output_dir, beta=recipe.objective.beta)
    return _trainer(ORPOTrainer, args, recipe, model, tokenizer, data, output_dir, callbacks)


def build_simpo(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    objective = recipe.objective
    # SimPO is CPO's "simpo" loss without CPO's behaviour-cloning term (cpo_alpha = 0).
    args = training_args(
        cpo.CPOConfig,
        recipe,
        plan,
        output_dir,
        loss_type="simpo",
        cpo_alpha=0.0,
        beta=objective.beta,
        simpo_gamma=objective.gamma,
    )
    return _trainer(CPOTrainer, args, recipe, model, tokenizer, data, output_dir, callbacks)


def build_kto(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    objective = recipe.objective
    args = training_args(
        trl.KTOConfig,
        recipe,
        plan,
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
    reference = _reference_model(recipe, model, tokenizer)
    return _trainer(KTOTrainer, args, recipe, model, tokenizer, unpaired, output_dir, callbacks, ref_model=reference)


def _unpaired(pairs: Dataset, seed: int) -> Dataset:
    """Each pair as two KTO rows (chosen: label True, rejected: False), in a fixed shuffled order so a batch
    mixes both labels and neighbours rarely share a prompt (KTO's KL estimate needs mismatched neighbours)."""
    from datasets import Dataset

    rows = [
        (prompt, response, side == "chosen_ids")
        for side in ("chosen_ids", "rejected_ids")
        for prompt, response in zip(pairs["prompt_ids"], pairs[side], strict=True)
    ]
    random.Random(seed).shuffle(rows)
    prompts, completions, labels = zip(*rows, strict=True)
    return Dataset.from_dict({"prompt_ids": prompts, "completion_ids": completions, "label": labels})


def build_reward_model(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    args = training_args(
        trl.RewardConfig,
        recipe,
        plan,
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


def score_preferences(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[PreferenceSample],
    recipe: Recipe,
    teacher: PreTrainedModel | None = None,
) -> tuple[dict[str, float], None]:
    """Held-out preference accuracy (percent of pairs scoring chosen above rejected) and the mean score margin.

    A language model scores a response by its log-probability summed over its tokens (EOS included), not
    length-normalised: the quantity DPO's implicit reward is built on. A reward model scores prompt + response
    with its scalar head.
    """
    model.eval()
    dataset, _ = encode_preference_dataset(samples, tokenizer, recipe.data, "eval data")
    reward_model = recipe.objective.model_kind == "sequence-classification"
    scores = {}
    for side in ("chosen", "rejected"):
        prompts, responses = dataset["prompt_ids"], dataset[f"{side}_ids"]
        input_ids = [p + r for p, r in zip(prompts, responses, strict=True)]
        if reward_model:
            scores[side] = sequence_rewards(model, tokenizer, input_ids, recipe.eval.batch_size)
        else:
            labels = [[IGNORE_INDEX] * len(p) + r for p, r in zip(prompts, responses, strict=True)]
            scores[side], _ = sequence_logps(model, tokenizer, input_ids, labels, recipe.eval.batch_size)
    return {
        "preference_accuracy": metrics.preference_accuracy(scores["chosen"], scores["rejected"]),
        "reward_margin" if reward_model else "logp_margin": metrics.mean_margin(scores["chosen"], scores["rejected"]),
    }, None


@torch.no_grad()
def sequence_rewards(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: list[list[int]], batch_size: int
) -> list[float]:
    """A reward model's scalar for each sequence (read at its last non-pad token)."""
    # The head finds each row's last token by the pad id; a base model loaded afresh may not name one.
    model.config.pad_token_id = tokenizer.pad_token_id
    rewards = []
    with progress.rows(len(input_ids), "reward") as advance:
        for ids, attn, _ in padded_batches(input_ids, batch_size, tokenizer.pad_token_id, model.device):
            rewards.extend(model(input_ids=ids, attention_mask=attn).logits[:, 0].float().tolist())
            advance(ids.size(0))
    return rewards
