"""Prompting baselines: the base model asked as it is (zero-shot) and with K worked examples in front (few-shot).

They answer "would prompting have done it?" beside the `base` and `tuned` columns. `base` is the untuned model
given the held-out prompts exactly as training formatted them (the recipe's chat template, system prompt, added
tokens); the prompting columns give the same base model the prompts as its own tokenizer formats them (its own chat
template, or plain text when it has none), so a recipe that trains a new template on a base model is compared
with what the model's maker ships. Where the two formats agree the zero-shot column is the base column.

Few-shot examples are other rows of the training split (never held-out rows, never a row equal to the one asked),
drawn anew for each held-out row by training.seed, and put in front as earlier turns of its conversation (their
answers carry no loss), or for plain prompt/completion rows as prompt+completion blocks, each ended by a blank line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmtune.data import Sample, encode, encode_prompt, encode_seq2seq, load_splits, prepare_tokenizer
from llmtune.errors import LLMTuneError
from llmtune.models import load_recipe_tokenizer
from llmtune.recipe import Recipe
from llmtune.recipe.training import prompting_shots

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Ends each worked example of plain (untemplated) rows: the row's own prompt and completion follow each other
# directly, as training wrote them, and the blank line keeps one example from running into the next.
BLOCK_SEPARATOR = "\n\n"


@dataclass
class PromptedSets:
    """The held-out rows of each prompting column, formatted for the base model's own tokenizer."""

    tokenizer: PreTrainedTokenizerBase
    samples: dict[str, list[Sample]]  # column name ('zero-shot', 'few-shot:3') -> its rows, in held-out order
    chat_template: bool  # the rows go through the tokenizer's own chat template (false: plain text)
    notes: list[str] = field(default_factory=list)


def prompted_sets(recipe: Recipe, rows: int, encoder_decoder: bool) -> PromptedSets:
    """The first `rows` held-out rows as each mode of recipe.eval.prompting asks them, checked to fit
    data.max_length; the worked examples come from the training split only."""
    tokenizer = load_recipe_tokenizer(recipe)
    own = bool(tokenizer.chat_template) and not encoder_decoder
    plain = recipe.model_copy(update={"data": recipe.data.model_copy(update={"chat_template": own})})
    prepare_tokenizer(plain, tokenizer)
    train_split, held_out = load_splits(plain)
    train, questions = train_split.samples, held_out.samples[:rows]
    sets = PromptedSets(tokenizer, {}, own)
    for mode in recipe.eval.prompting:
        shots = prompting_shots(mode)
        if shots == 0:
            sets.samples[mode] = questions
            continue
        rng = random.Random(recipe.training.seed)
        prompted = []
        for number, row in enumerate(questions, 1):
            # A training row equal to the held-out row would hand the model its answer.
            candidates = [s for s in train if s != row]
            if shots > len(candidates):
                raise LLMTuneError(
                    f"eval.prompting {mode}: the training data has {len(candidates)} rows to draw examples from for "
                    f"held-out row {number}; give K at most {len(candidates)}"
                )
            prompted.append(with_examples(row, rng.sample(candidates, shots), recipe.data.system_prompt))
        _check_fits(mode, prompted, questions, tokenizer, recipe, encoder_decoder)
        sets.samples[mode] = prompted
    return sets


def with_examples(row: Sample, examples: list[Sample], system_prompt: str | None = None) -> Sample:
    """`row` with `examples` in front: as earlier user/assistant turns after its system message, or as plain
    prompt+completion blocks after the system prompt's text; no example token carries loss."""
    if row.messages is not None:
        lead = next((i for i, m in enumerate(row.messages) if m["role"] != "system"), len(row.messages))
        turns = [
            {**m, "train": False} if m["role"] == "assistant" else m
            for example in examples
            for m in example.messages
            if m["role"] != "system"
        ]
        return Sample(messages=[*row.messages[:lead], *turns, *row.messages[lead:]])
    # Plain rows start with the system prompt's text when the recipe sets one; each example holds it too.
    lead = 1 if system_prompt and row.segments[0] == (system_prompt, False) else 0
    blocks = [("".join(text for text, _ in example.segments[lead:]) + BLOCK_SEPARATOR, False) for example in examples]
    return Sample(segments=[*row.segments[:lead], *blocks, *row.segments[lead:]])


def _check_fits(
    mode: str,
    prompted: list[Sample],
    questions: list[Sample],
    tokenizer: PreTrainedTokenizerBase,
    recipe: Recipe,
    encoder_decoder: bool,
) -> None:
    """Refuse examples that push a row past data.max_length: truncating it would cut its answer (which perplexity
    scores) and dropping examples would give rows different K, so the column would no longer be K-shot."""
    limit = recipe.data.max_length
    loss_on = getattr(recipe.objective, "loss_on", "response")

    def length(sample: Sample) -> int:
        if encoder_decoder:
            return max(len(ids) for ids in encode_seq2seq(sample, tokenizer))
        return len(encode(sample, tokenizer, loss_on)[0])

    over = [(length(p), i) for i, (p, q) in enumerate(zip(prompted, questions, strict=True), 1) if length(q) <= limit]
    over = [(n, i) for n, i in over if n > limit]
    if over:
        longest, number = max(over)
        raise LLMTuneError(
            f"eval.prompting {mode}: {len(over)} of {len(prompted)} held-out rows exceed data.max_length={limit} "
            f"with their examples (row {number}: {longest} tokens); raise it (--set data.max_length={longest}) or "
            "lower K"
        )


def same_inputs(
    samples: list[Sample],
    tokenizer: PreTrainedTokenizerBase,
    other: list[Sample],
    other_tokenizer: PreTrainedTokenizerBase,
    encoder_decoder: bool,
) -> bool:
    """Whether two formattings give a model the same token ids: prompts and whole rows alike."""

    def ids(sample: Sample, tok: PreTrainedTokenizerBase) -> tuple:
        whole = encode_seq2seq(sample, tok) if encoder_decoder else encode(sample, tok)
        return encode_prompt(sample.prompt_and_reference()[0], tok, encoder_decoder), whole

    return len(samples) == len(other) and all(
        ids(a, tokenizer) == ids(b, other_tokenizer) for a, b in zip(samples, other, strict=True)
    )


def decoded_prompts(sets: PromptedSets, encoder_decoder: bool) -> dict[str, list[str]]:
    """The exact text each prompting column's model was given for each row, as the predictions file keeps it."""
    return {
        mode: [
            sets.tokenizer.decode(encode_prompt(s.prompt_and_reference()[0], sets.tokenizer, encoder_decoder))
            for s in samples
        ]
        for mode, samples in sets.samples.items()
    }
