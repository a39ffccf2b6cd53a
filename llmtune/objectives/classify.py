"""Sequence classification: a new head over the model maps each text to one of objective.labels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from llmtune import metrics, progress
from llmtune.batching import padded_batches
from llmtune.data import PreparedData, Sample, encode_classification, encode_splits
from llmtune.objectives.base import _trainer, training_args
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def prepare_classification(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    return encode_splits(recipe, tokenizer, encode_classification, recipe.objective.labels)


class ClassifyTrainer(GuardedTrainerMixin, Trainer):
    """transformers' Trainer with llmtune's checkpoints and guards: cross-entropy of the head's logits."""


def build_classify(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    """Sequence classification with transformers' Trainer: cross-entropy of the head's logits on the label."""
    args = training_args(TrainingArguments, recipe, plan, output_dir)
    return _trainer(
        ClassifyTrainer,
        args,
        recipe,
        model,
        tokenizer,
        data,
        output_dir,
        callbacks,
        data_collator=DataCollatorWithPadding(tokenizer),
    )


def score_classify(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    recipe: Recipe,
    teacher: PreTrainedModel | None = None,
) -> tuple[dict[str, float], None]:
    """Accuracy and macro-F1 of the most probable label, on rows tokenized as in training."""
    labels = recipe.objective.labels
    dataset, _ = encode_classification(samples, tokenizer, recipe.data, labels, "eval data")
    probs = class_probabilities(model, tokenizer, dataset["input_ids"], recipe.eval.batch_size)
    predicted = probs.argmax(-1).tolist()
    references = dataset["labels"]
    results = {"accuracy": metrics.accuracy(predicted, references)}
    results["f1"] = metrics.macro_f1(predicted, references, len(labels))
    return {m: results[m] for m in recipe.eval.metrics}, None


@torch.no_grad()
def class_probabilities(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids: list[list[int]], batch_size: int
) -> torch.Tensor:
    """Softmax over a classifier's labels for each row, right-padded (decoders pool the last real token)."""
    model.eval()
    out = []
    with progress.rows(len(input_ids), "classify") as advance:
        for ids, attn, _ in padded_batches(input_ids, batch_size, tokenizer.pad_token_id, model.device):
            out.append(model(input_ids=ids, attention_mask=attn).logits.float().softmax(-1))
            advance(ids.size(0))
    return torch.cat(out)


def classify_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, recipe: Recipe) -> str:
    """The predicted label of one text, then every label's probability, most probable first."""
    sample = Sample(segments=[(text, False)], label=0)
    dataset, _ = encode_classification([sample], tokenizer, recipe.data, recipe.objective.labels, "the prompt")
    [probs] = class_probabilities(model, tokenizer, dataset["input_ids"], 1).tolist()
    ranked = sorted(zip(recipe.objective.labels, probs, strict=True), key=lambda item: -item[1])
    return f"{ranked[0][0]}  ({', '.join(f'{name} {p:.3f}' for name, p in ranked)})"
