"""Training rows exactly as the model sees them, and the checks for data bugs that train without an error.

Three such bugs give a model that looks trained but misbehaves: a row whose labels are all masked (it
teaches nothing), an EOS that carries no loss (the model never learns to stop), and a chat template at
inference that differs from the one used in training (prompts arrive in a format the model never saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.artifacts import RECIPE_FILE, is_run_dir, open_run
from llmtune.data import IGNORE_INDEX, encode_dataset, interleave, load_splits, prepare_tokenizer, split_counts
from llmtune.errors import LLMTuneError
from llmtune.models import load_recipe_tokenizer, load_tokenizer
from llmtune.recipe import Recipe, load_recipe
from llmtune.templates import stop_token_ids, stop_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Tokens of left context decoded with each token: SentencePiece decoders drop a word's leading space at the
# start of a text, so a token decoded alone would lose it.
_CONTEXT = 8


@dataclass(frozen=True)
class Token:
    id: int
    text: str  # this token's share of the decoded row; "" for all but the last token of a character split over tokens
    loss: bool
    eos: bool


@dataclass(frozen=True)
class DataPreview:
    rows: list[list[Token]]  # the first training rows (of each source of a mixture), after truncation and dropping
    row_sources: list[str]  # the label of the source each row comes from
    counts: dict[str, Any]  # from encode_dataset: rows, tokens, loss_tokens, truncated, dropped; a mixture: by source
    pad_tokens: int  # added when consecutive rows are batched and padded to the batch's longest row
    batch_size: int
    max_length: int

    @property
    def loss_fraction(self) -> float:
        return self.counts["loss_tokens"] / self.counts["tokens"]

    @property
    def padding_waste(self) -> float:
        return self.pad_tokens / (self.counts["tokens"] + self.pad_tokens)


def preview_data(target: str | Path, n: int = 3, overrides: list[str] | None = None) -> DataPreview:
    """Preview a recipe's training data; for a run directory, also compare its saved chat template with the
    one its recipe's tokenizer has now."""
    target = Path(target)
    run = open_run(target) if is_run_dir(target) else None
    recipe = load_recipe(run.file(RECIPE_FILE) if run else target, overrides)
    reference = recipe.tokenizer or recipe.model
    tokenizer = load_recipe_tokenizer(recipe)
    prepare_tokenizer(recipe, tokenizer)
    # With data.chat_template off, neither training nor inference renders a template: nothing to compare.
    if run is not None and recipe.data.chat_template:
        saved = load_tokenizer(str(run.tokenizer)).chat_template
        check_chat_template(tokenizer.chat_template, saved, f"{run.tokenizer}", reference)
    return build_preview(recipe, tokenizer, n)


def build_preview(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, n: int = 3) -> DataPreview:
    """Encode the training split as `finetune` does, check every row, and keep the first `n` of each source."""
    if recipe.objective.predicts_labels:
        target = "one tag per word" if recipe.objective.name == "token-classify" else "one label per row"
        raise LLMTuneError(
            f"data preview shows which tokens carry loss; a classifier's target is {target}: "
            f"llmtune validate checks {', '.join(label for _, label, _ in recipe.data.sources('train'))} and its labels"
        )
    # Objectives without loss_on show each row with its response (a preference pair: its chosen response).
    loss_on = getattr(recipe.objective, "loss_on", "response")
    if recipe.objective.name == "lm":
        from llmtune.objectives.lm import block_encoder

        encode = block_encoder(tokenizer, recipe.data.max_length, keep_remainder=False)
    else:
        encode = partial(encode_dataset, tokenizer=tokenizer, spec=recipe.data, loss_on=loss_on)
    train, _ = load_splits(recipe)
    shown, shown_sources, lengths, counts = [], [], [], []
    for part in train.parts:
        if not part.samples:  # a weighted mixture can draw no row from a source
            lengths.append([])
            counts.append(None)
            continue
        dataset, part_counts = encode(part.samples, source=part.label)
        rows = list(zip(dataset["input_ids"], dataset["labels"], strict=True))
        if loss_on == "target":
            # An encoder-decoder row is shown as its source (encoder input, no loss) followed by its target.
            rows = [(ids + labels, [IGNORE_INDEX] * len(ids) + labels) for ids, labels in rows]
        # Truncation (and lm's blocks) cut rows anywhere; only then may a full-length row lack its EOS.
        cut = recipe.data.max_length if part_counts["truncated"] or recipe.objective.name == "lm" else None
        check_labels(rows, tokenizer, part.label, cut)
        shown += [token_view(ids, labels, tokenizer) for ids, labels in rows[:n]]
        shown_sources += [part.label] * min(n, len(rows))
        lengths.append([len(ids) for ids, _ in rows])
        counts.append(part_counts)
    in_order = [lengths[i][j] for i, j in interleave(train.order, [len(x) for x in lengths])]
    return DataPreview(
        rows=shown,
        row_sources=shown_sources,
        counts=split_counts(train, counts),
        pad_tokens=pad_tokens(in_order, recipe.training.batch_size),
        batch_size=recipe.training.batch_size,
        max_length=recipe.data.max_length,
    )


def token_view(ids: list[int], labels: list[int], tokenizer: PreTrainedTokenizerBase) -> list[Token]:
    """One `Token` per id, its text decoded in context so that the texts join into the decoded row."""
    tokens = []
    start = 0  # first token whose text is not yet emitted
    for i, (token_id, label) in enumerate(zip(ids, labels, strict=True)):
        lo = max(0, start - _CONTEXT)
        before, through = _decode(tokenizer, ids[lo:start]), _decode(tokenizer, ids[lo : i + 1])
        if through.endswith("\ufffd") and i + 1 < len(ids):
            text = ""  # the leading bytes of a character that the next tokens complete
        else:
            text = through[len(before) :] if through.startswith(before) else _decode(tokenizer, ids[start : i + 1])
            start = i + 1
        tokens.append(Token(token_id, text, label != IGNORE_INDEX, token_id == tokenizer.eos_token_id))
    return tokens


def pad_tokens(lengths: list[int], batch_size: int) -> int:
    """Padding added when batches of `batch_size` consecutive rows are padded to their longest row."""
    batches = (lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size))
    return sum(max(b) * len(b) - sum(b) for b in batches)


def check_labels(
    rows: list[tuple[list[int], list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    truncated_length: int | None = None,
) -> None:
    """Raise when a row has every label masked, or when no stop token (EOS, the template's end of turn) is among
    a row's loss tokens.

    Args:
        rows: (input_ids, labels) of each training row.
        truncated_length: rows of this length may have lost their EOS to truncation and are not checked for it.
    """
    stops = stop_token_ids(tokenizer)
    without_eos = []
    for i, (ids, labels) in enumerate(rows, 1):
        if all(t == IGNORE_INDEX for t in labels):
            raise LLMTuneError(
                f"{source}: training row {i} {_snippet(tokenizer, ids)} has every label masked, so it teaches nothing"
            )
        if not any(t in labels for t in stops) and len(ids) != truncated_length:
            without_eos.append(i)
    if without_eos:
        first = without_eos[0]
        raise LLMTuneError(
            f"{source}: no stop token ({' / '.join(map(repr, stop_tokens(tokenizer)))}, as one token of the "
            f"vocabulary) carries loss in {len(without_eos)} of {len(rows)} "
            f"training rows (first: row {first} {_snippet(tokenizer, rows[first - 1][0])}), so the tuned model would "
            "not learn to stop; check the tokenizer's eos_token against its chat template"
        )


def check_chat_template(trained: Any, saved: Any, saved_at: str, reference: str) -> None:
    """Raise when the chat template saved for inference differs from the one training renders with."""
    if trained == saved:
        return
    trained_text, saved_text = str(trained or ""), str(saved or "")
    at = next(
        (k for k, (a, b) in enumerate(zip(trained_text, saved_text, strict=False)) if a != b),
        min(len(trained_text), len(saved_text)),
    )
    raise LLMTuneError(
        f"{saved_at}: the chat template saved for inference differs from the one {reference!r} has now, which "
        f"training renders with (first difference at character {at}: saved {saved_text[at : at + 30]!r}, "
        f"now {trained_text[at : at + 30]!r}); prompts at inference would not look like training rows; train again, "
        f"or set the recipe's tokenizer: {saved_at}"
    )


def _decode(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _snippet(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    text = _decode(tokenizer, ids)
    return f"({text[:60]!r}{'...' if len(text) > 60 else ''})"
