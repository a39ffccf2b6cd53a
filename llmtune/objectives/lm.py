"""Continued pretraining: text joined with EOS and cut into data.max_length blocks, every token a label.

It trains as SFT does (sft.build_sft) over those blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtune import metrics
from llmtune.data import PreparedData, Sample, lm_blocks, split_samples
from llmtune.evaluation import response_nll
from llmtune.recipe import Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def prepare_blocks(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Objective lm: every token carries loss; training drops the tail shorter than a block, held-out keeps it."""
    from datasets import Dataset

    train_samples, eval_samples = split_samples(recipe)
    block = recipe.data.max_length
    datasets, report = {}, {}
    for split, samples, keep, source in (
        ("train", train_samples, False, recipe.data.train),
        ("eval", eval_samples, True, recipe.data.eval or recipe.data.train),
    ):
        if samples:
            blocks, report[split] = lm_blocks(samples, tokenizer, block, keep, source)
            datasets[split] = Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})
    return PreparedData(train=datasets["train"], eval=datasets.get("eval"), eval_samples=eval_samples, report=report)


def score_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    recipe: Recipe,
    teacher: PreTrainedModel | None = None,
) -> tuple[dict[str, float], None]:
    """Perplexity over every held-out token, in the same blocks training used (the short last block kept)."""
    model.eval()
    blocks, _ = lm_blocks(samples, tokenizer, recipe.data.max_length, keep_remainder=True, source="eval data")
    nll, n = response_nll(model, tokenizer, blocks, blocks, recipe.eval.batch_size)
    return {"perplexity": metrics.perplexity(nll, n), "loss": nll / n}, None
