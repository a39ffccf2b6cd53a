"""Continued pretraining: text joined with EOS and cut into data.max_length blocks, every token a label.

It trains as SFT does (sft.build_sft) over those blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmtune import metrics
from llmtune.data import PreparedData, Sample, lm_blocks, load_splits, prepare_splits
from llmtune.evaluation import response_nll
from llmtune.recipe import Recipe

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def prepare_blocks(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Objective lm: every token carries loss; training drops the tail shorter than a block, held-out keeps it.
    Each source of a mixture is cut into blocks on its own, so its counts are its own."""
    train, held_out = load_splits(recipe)
    block = recipe.data.max_length
    return prepare_splits(
        train, held_out, block_encoder(tokenizer, block, False), block_encoder(tokenizer, block, True)
    )


def block_encoder(
    tokenizer: PreTrainedTokenizerBase, block: int, keep_remainder: bool
) -> Callable[[list[Sample], str], tuple[Dataset, dict[str, Any]]]:
    """`encode(samples, source)` giving a source's blocks (every token a label) and their counts."""
    from datasets import Dataset

    def encode(samples: list[Sample], source: str) -> tuple[Dataset, dict[str, Any]]:
        blocks, counts = lm_blocks(samples, tokenizer, block, keep_remainder, source)
        return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]}), counts

    return encode


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
