"""Token classification (POS tagging, NER): a new head gives each word one of objective.labels, at its first
sub-token."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import Trainer

from llmtune import metrics, progress
from llmtune.batching import padded_batches
from llmtune.data import IGNORE_INDEX, PreparedData, Sample, encode_splits, encode_token_classification
from llmtune.errors import LLMTuneError
from llmtune.objectives.base import _rows_trainer
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def prepare_tagged(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    return encode_splits(recipe, tokenizer, encode_token_classification, recipe.objective.labels)


class TokenClassifyTrainer(GuardedTrainerMixin, Trainer):
    """transformers' Trainer with llmtune's checkpoints and guards: the head's cross-entropy at first sub-tokens."""


def build_token_classify(recipe, model, tokenizer, data, output_dir, callbacks, plan) -> Trainer:
    """The model's own loss: cross-entropy of the head's logits at each word's first sub-token (others are -100)."""
    return _rows_trainer(TokenClassifyTrainer, recipe, model, tokenizer, data, output_dir, callbacks, plan)


def score_token_classify(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    recipe: Recipe,
    teacher: PreTrainedModel | None = None,
) -> tuple[dict[str, float], list[list[str | None]]]:
    """Word accuracy and precision / recall / F1 (entities by objective.scheme, else per tag), on rows tokenized as
    in training; returns each row's predicted tags, None for words past data.max_length (not scored)."""
    objective = recipe.objective
    labels = objective.labels
    predicted = predict_tags(model, tokenizer, samples, recipe)
    # Words cut by max_length have no prediction: both sides keep only the words the model tagged.
    kept = [len([t for t in row if t is not None]) for row in predicted]
    references = [s.tags[:n] for s, n in zip(samples, kept, strict=True)]
    guesses = [row[:n] for row, n in zip(predicted, kept, strict=True)]
    flat_ref = [labels.index(t) for row in references for t in row]
    flat_pred = [labels.index(t) for row in guesses for t in row]
    results = {"accuracy": metrics.accuracy(flat_pred, flat_ref)}
    if objective.scheme == "none":
        results.update(metrics.macro_scores(flat_pred, flat_ref, len(labels)))
    else:
        results.update(metrics.entity_scores(guesses, references, objective.scheme))
    return {m: results[m] for m in recipe.eval.metrics}, predicted


@torch.no_grad()
def predict_tags(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, samples: list[Sample], recipe: Recipe
) -> list[list[str | None]]:
    """The most probable tag of each word, read at its first sub-token; None for words max_length cut off."""
    # Every row is scored, a long one truncated even under overflow: drop, so predictions line up with the rows.
    spec = recipe.data.model_copy(update={"overflow": "truncate"})
    dataset, _ = encode_token_classification(samples, tokenizer, spec, recipe.objective.labels, "eval data")
    model.eval()
    labels = recipe.objective.labels
    out = []
    with progress.rows(len(samples), "tag") as advance:
        batches = padded_batches(
            dataset["input_ids"], recipe.eval.batch_size, tokenizer.pad_token_id, model.device, dataset["labels"]
        )
        for ids, attn, lab in batches:
            best = model(input_ids=ids, attention_mask=attn).logits.argmax(-1)
            for row, targets in zip(best.tolist(), lab.tolist(), strict=True):
                out.append([labels[p] for p, t in zip(row, targets, strict=True) if t != IGNORE_INDEX])
            advance(ids.size(0))
    return [tags + [None] * (len(s.words) - len(tags)) for s, tags in zip(samples, out, strict=True)]


def tag_text(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, recipe: Recipe) -> str:
    """The text's words (split at whitespace, as the data gives them) each with its tag: `word/TAG word/TAG`."""
    words = text.split()
    if not words:
        raise LLMTuneError("the prompt has no words to tag")
    sample = Sample(segments=[(text, False)], words=words, tags=[recipe.objective.labels[0]] * len(words))
    [tags] = predict_tags(model, tokenizer, [sample], recipe)
    return " ".join(f"{word}/{tag}" if tag is not None else word for word, tag in zip(words, tags, strict=True))
