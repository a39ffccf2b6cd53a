"""The noise of the denoising objectives: BERT's masked tokens (objective mlm) and T5's noise spans replaced by
sentinels (objective span-corruption), and the tokens they need on the tokenizer.

Every draw comes from `row_rng(seed, salt, row)`: a generator of its own per row, so a row's mask depends only on
training.seed, the epoch (or the held-out salt) and the row's tokens, never on the order batches were drawn in. That
is what makes a resumed run draw the masks the uninterrupted run would have, and base and tuned models be scored
on the same held-out masks.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import random
from typing import TYPE_CHECKING

from llmtune.data import IGNORE_INDEX
from llmtune.errors import LLMTuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from llmtune.data import Sample
    from llmtune.recipe import Recipe

# BERT's name for it; a tokenizer without a mask token gets this one.
MASK_TOKEN = "[MASK]"
# T5's sentinels, <extra_id_0> first; a tokenizer without them gets SENTINELS of them, as T5's vocabulary has.
SENTINEL = "<extra_id_{}>"
SENTINELS = 100
# The salt of the held-out masks: training draws with the epoch (0, 1, ...) instead.
HELD_OUT = "held-out"


def row_rng(seed: int, salt: int | str, row: list[int]) -> random.Random:
    """The generator of one row's draws. Keyed by the row's tokens rather than its index: the index of a row
    changes when sources are mixed or rows dropped, its tokens do not."""
    digest = hashlib.sha256(array.array("q", row).tobytes()).hexdigest()
    # A string seed is hashed (sha512) by random.Random, so the streams of similar rows are unrelated.
    return random.Random(f"{seed}/{salt}/{digest}")


# --- tokens ------------------------------------------------------------------------------------------


def add_objective_tokens(objective: str, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give the tokenizer the tokens `objective` writes into its inputs; returns those it had to add (their
    embedding rows are new)."""
    if objective == "mlm" and tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
        return [MASK_TOKEN]
    if objective == "span-corruption" and not sentinel_ids(tokenizer):
        added = [SENTINEL.format(i) for i in range(SENTINELS)]
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        return added
    return []


def objective_tokens(objective: str, tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The tokens `objective` writes that the model needs embedding rows for (see models.fit_vocabulary)."""
    if objective == "mlm" and tokenizer.mask_token is not None:
        return (tokenizer.mask_token,)
    if objective == "span-corruption":
        return tuple(SENTINEL.format(i) for i in range(len(sentinel_ids(tokenizer))))
    return ()


def sentinel_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... as far as the tokenizer has them in order."""
    vocab = tokenizer.get_vocab()
    ids = []
    while SENTINEL.format(len(ids)) in vocab:
        ids.append(vocab[SENTINEL.format(len(ids))])
    return ids


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every special token, also those added to the tokenizer without a named role (a chat template's)."""
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


# --- text into rows ----------------------------------------------------------------------------------


def text_windows(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, width: int, wrap: bool
) -> tuple[list[list[int]], int]:
    """Each text's tokens cut into consecutive windows of at most `width` tokens, none lost, the windows of one
    text of near-equal length (so no window is a stub too short to corrupt); with `wrap`, each window inside the
    special tokens the tokenizer puts around one sequence (BERT's [CLS] ... [SEP]), within `width` too.

    Returns the windows and how many texts were too short to corrupt (under 2 tokens, skipped)."""
    prefix, suffix = special_wrap(tokenizer) if wrap else ([], [])
    room = width - len(prefix) - len(suffix)
    windows, skipped = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 2:
            skipped += 1
            continue
        n = -(-len(ids) // room)
        bounds = [len(ids) * k // n for k in range(n + 1)]
        windows += [prefix + ids[a:b] + suffix for a, b in itertools.pairwise(bounds)]
    return windows, skipped


def text_rows(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, samples: list[Sample]) -> tuple[list[list[int]], int]:
    """The uncorrupted rows of `samples` and how many texts were too short to use: a masked LM's rows carry the
    tokenizer's own special tokens ([CLS] ... [SEP]); span corruption's leave room for the EOS its input ends in."""
    mlm = recipe.objective.name == "mlm"
    width = recipe.data.max_length - (0 if mlm else 1)
    prefix, suffix = special_wrap(tokenizer) if mlm else ([], [])
    if width - len(prefix) - len(suffix) < 4:
        raise LLMTuneError(f"data.max_length={recipe.data.max_length} leaves no room for text; raise it")
    return text_windows([s.segments[0][0] for s in samples], tokenizer, width, wrap=mlm)


def special_wrap(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a single sequence, read off one example."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


# --- masked LM (BERT) --------------------------------------------------------------------------------


def mask_tokens(
    ids: list[int], probability: float, mask_id: int, specials: set[int], vocab_size: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """BERT's masking of one row: round(probability x its non-special tokens) positions chosen (at least one),
    each replaced by the mask token (80%), a random non-special token (10%) or left as it is (10%).

    Returns the model's input and the labels: the original token at the chosen positions, -100 elsewhere. As in
    BERT's own data code the count is exact per row, not a coin per token.
    """
    candidates = [i for i, t in enumerate(ids) if t not in specials]
    chosen = sorted(rng.sample(candidates, min(len(candidates), max(1, round(len(candidates) * probability)))))
    inputs, labels = list(ids), [IGNORE_INDEX] * len(ids)
    for i in chosen:
        labels[i] = ids[i]
        draw = rng.random()
        if draw < 0.8:
            inputs[i] = mask_id
        elif draw < 0.9:
            inputs[i] = _random_token(rng, vocab_size, specials)
    return inputs, labels


def _random_token(rng: random.Random, vocab_size: int, specials: set[int]) -> int:
    # Special tokens are never the random replacement: a stray [MASK] or [SEP] would be a different corruption.
    while (token := rng.randrange(vocab_size)) in specials:
        pass
    return token


# --- span corruption (T5) ----------------------------------------------------------------------------


def noise_span_mask(length: int, density: float, mean_span: float, rng: random.Random) -> list[bool]:
    """T5's random_spans_noise_mask: round(length x density) noise tokens in round(noise / mean_span) spans,
    noise and non-noise span lengths each a random segmentation, interleaved starting with non-noise.

    As T5 there is at least one noise token, one non-noise token and one span; a row too short to give every
    span a non-noise token in front gets fewer spans.
    """
    noise = min(max(round(length * density), 1), length - 1)
    spans = min(max(round(noise / mean_span), 1), length - noise)
    mask: list[bool] = []
    for kept, noisy in zip(_segment(length - noise, spans, rng), _segment(noise, spans, rng), strict=True):
        mask += [False] * kept + [True] * noisy
    return mask


def _segment(items: int, segments: int, rng: random.Random) -> list[int]:
    """`items` split into `segments` non-empty runs at random: T5's _random_segmentation (a shuffled set of
    segment starts)."""
    starts = [1] * (segments - 1) + [0] * (items - segments)
    rng.shuffle(starts)
    lengths = [0] * segments
    segment = 0
    for first in [0, *starts]:
        segment += first
        lengths[segment] += 1
    return lengths


def corrupt_spans(ids: list[int], mask: list[bool], sentinels: list[int], eos: int) -> tuple[list[int], list[int]]:
    """T5's inputs and targets for one row: each noise span replaced by the next sentinel in the input; the target
    is sentinel_0 span_0 sentinel_1 span_1 ... then one more sentinel closing the last span, and EOS."""
    inputs, targets, span = [], [], -1
    for i, (token, noisy) in enumerate(zip(ids, mask, strict=True)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                span += 1
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(token)
        else:
            inputs.append(token)
    return [*inputs, eos], [*targets, sentinels[span + 1], eos]


def spans_needed(length: int, density: float, mean_span: float) -> int:
    """Sentinels a row of `length` tokens needs: one per span and the closing one."""
    noise = min(max(round(length * density), 1), length - 1)
    return min(max(round(noise / mean_span), 1), length - noise) + 1


def check_sentinels(tokenizer: PreTrainedTokenizerBase, longest: int, density: float, mean_span: float) -> list[int]:
    sentinels = sentinel_ids(tokenizer)
    needed = spans_needed(longest, density, mean_span)
    if needed > len(sentinels):
        raise LLMTuneError(
            f"objective span-corruption: a row of {longest} tokens needs {needed} sentinel tokens and the tokenizer "
            f"has {len(sentinels)} (<extra_id_0> ...); lower data.max_length"
        )
    return sentinels
