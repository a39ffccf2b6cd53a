"""The masks and sentinels of objectives mlm (BERT) and span-corruption (T5), checked exactly on the tiny tokenizers."""

from __future__ import annotations

import itertools
import random

import pytest
from helpers import counting_corpus, expect_error, write_denoising_recipe

from llmtune import masking
from llmtune.data import IGNORE_INDEX
from llmtune.models import load_tokenizer
from llmtune.objectives import prepare_data
from llmtune.objectives.denoising import CorruptingCollator, _MaskEpoch, corrupter
from llmtune.recipe import load_recipe


@pytest.fixture(scope="module")
def bert_tok():
    tok = load_tokenizer("tiny:bert")
    assert masking.add_objective_tokens("mlm", tok) == ["[MASK]"]
    return tok


@pytest.fixture(scope="module")
def t5_tok():
    tok = load_tokenizer("tiny:t5")
    added = masking.add_objective_tokens("span-corruption", tok)
    assert added == [f"<extra_id_{i}>" for i in range(100)]
    return tok


# --- tokens ------------------------------------------------------------------------------------------


def test_objective_tokens_are_added_once_and_kept_from_a_real_tokenizer(bert_tok, t5_tok):
    assert bert_tok.mask_token == "[MASK]" and bert_tok.mask_token_id == len(bert_tok) - 1
    assert masking.add_objective_tokens("mlm", bert_tok) == []  # already there
    sentinels = masking.sentinel_ids(t5_tok)
    assert len(sentinels) == 100 and sentinels == list(range(259, 359))
    assert masking.add_objective_tokens("span-corruption", t5_tok) == []
    # A sentinel written in a prompt is one token, as T5's own tokenizer reads it.
    assert t5_tok("a <extra_id_3> b", add_special_tokens=False)["input_ids"][2] == sentinels[3]
    minilm = load_tokenizer("builtin:all-minilm-l6-v2")
    assert masking.add_objective_tokens("mlm", minilm) == [] and minilm.mask_token == "[MASK]"
    assert masking.special_wrap(minilm) == ([101], [102])  # [CLS] ... [SEP]


def test_a_row_needing_more_sentinels_than_the_tokenizer_has_is_refused(t5_tok):
    assert masking.spans_needed(4000, 0.15, 3.0) == 201
    with expect_error("needs 201 sentinel tokens", "has 100", "lower data.max_length"):
        masking.check_sentinels(t5_tok, 4000, 0.15, 3.0)


# --- masked LM -----------------------------------------------------------------------------------------


def row_of(tok, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    specials = masking.special_ids(tok)
    body = [t for t in (rng.randrange(len(tok)) for _ in range(4 * n)) if t not in specials][:n]
    prefix, suffix = masking.special_wrap(tok)
    return prefix + body + suffix


def test_mask_chooses_15_percent_of_the_non_special_tokens_and_labels_only_those(bert_tok):
    specials = masking.special_ids(bert_tok)
    assert specials == {0, 1, 2, bert_tok.mask_token_id}
    ids = row_of(bert_tok, 40, seed=1)
    # A special token in the middle of the text is never chosen either.
    ids = ids[:10] + [1, 2] + ids[10:]
    inputs, labels = masking.mask_tokens(
        ids, 0.15, bert_tok.mask_token_id, specials, len(bert_tok), masking.row_rng(0, 0, ids)
    )
    chosen = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert len(chosen) == round(40 * 0.15) == 6
    assert all(ids[i] not in specials for i in chosen)
    assert [labels[i] for i in chosen] == [ids[i] for i in chosen]
    assert all(inputs[i] == ids[i] for i in range(len(ids)) if i not in chosen)
    # Deterministic per (seed, salt, row); another epoch or seed draws another mask.
    again = masking.mask_tokens(ids, 0.15, bert_tok.mask_token_id, specials, len(bert_tok), masking.row_rng(0, 0, ids))
    assert again == (inputs, labels)
    other_epoch = masking.mask_tokens(
        ids, 0.15, bert_tok.mask_token_id, specials, len(bert_tok), masking.row_rng(0, 1, ids)
    )
    other_seed = masking.mask_tokens(
        ids, 0.15, bert_tok.mask_token_id, specials, len(bert_tok), masking.row_rng(1, 0, ids)
    )
    assert other_epoch[1] != labels and other_seed[1] != labels


@pytest.mark.parametrize(("n", "probability", "expected"), [(1, 0.15, 1), (3, 0.15, 1), (20, 0.15, 3), (20, 0.5, 10)])
def test_mask_count_is_round_of_probability_times_candidates_and_at_least_one(bert_tok, n, probability, expected):
    ids = row_of(bert_tok, n, seed=n)
    _, labels = masking.mask_tokens(
        ids, probability, bert_tok.mask_token_id, masking.special_ids(bert_tok), len(bert_tok), random.Random(0)
    )
    assert sum(t != IGNORE_INDEX for t in labels) == expected


def test_chosen_tokens_split_80_10_10_within_binomial_bounds(bert_tok):
    specials, mask_id = masking.special_ids(bert_tok), bert_tok.mask_token_id
    masked = random_token = kept = 0
    for seed in range(400):
        ids = row_of(bert_tok, 100, seed)
        inputs, labels = masking.mask_tokens(ids, 0.15, mask_id, specials, len(bert_tok), masking.row_rng(seed, 0, ids))
        for i, label in enumerate(labels):
            if label == IGNORE_INDEX:
                continue
            assert inputs[i] not in specials - {mask_id}  # a random replacement is never a special token
            if inputs[i] == mask_id:
                masked += 1
            elif inputs[i] == ids[i]:
                kept += 1  # includes random draws that hit the original token (p = 1/256, inside the bounds)
            else:
                random_token += 1
    total = masked + random_token + kept
    assert total == 400 * 15
    # Four standard deviations of a binomial count: fails about once in 15,000 runs of a wrong split, never by chance.
    for count, p in ((masked, 0.8), (random_token, 0.1), (kept, 0.1)):
        assert abs(count - total * p) < 4 * (total * p * (1 - p)) ** 0.5, (masked, random_token, kept)


def test_prepared_mlm_rows_train_unmasked_and_hold_out_fixed_masks(tmp_path, bert_tok):
    tok = bert_tok
    recipe = load_recipe(write_denoising_recipe(tmp_path, "mlm"))
    data = prepare_data(recipe, tok)
    specials = masking.special_ids(tok)
    for ids in data.train["input_ids"]:
        assert ids[0] == tok.bos_token_id and len(ids) <= 32 and tok.mask_token_id not in ids
    # Nothing lost: the training rows are the texts' tokens in order, each window behind its [CLS] stand-in.
    texts = counting_corpus(24).strip().split("\n\n")
    stream = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]]
    assert [t for ids in data.train["input_ids"] for t in ids[1:]] == stream
    for ids, labels in zip(data.eval["input_ids"], data.eval["labels"], strict=True):
        chosen = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
        assert len(chosen) == max(1, round((len(ids) - 1) * 0.15))
        assert all(labels[i] not in specials for i in chosen)
    # Held-out masks are the same on every preparation: base and tuned are scored on one set.
    assert prepare_data(recipe, tok).eval["input_ids"] == data.eval["input_ids"]
    assert data.report["eval"]["loss_tokens"] == sum(t != IGNORE_INDEX for r in data.eval["labels"] for t in r)


def test_collator_masks_a_training_row_by_its_epoch_and_passes_held_out_rows(tmp_path, bert_tok):
    recipe = load_recipe(write_denoising_recipe(tmp_path, "mlm"))
    corrupt = corrupter(recipe, bert_tok)
    collator = CorruptingCollator(corrupt, bert_tok.pad_token_id)
    row = row_of(bert_tok, 30, seed=3)
    held = corrupt(row, masking.HELD_OUT)
    epochs = []
    for epoch in (0, 1, 0):
        # What the Trainer's state says when an epoch begins, also right after a resume in the middle of one.
        _MaskEpoch(collator).on_epoch_begin(None, type("State", (), {"epoch": epoch + 0.5})(), None)
        batch = collator([{"input_ids": row}, {"input_ids": held[0], "labels": held[1]}])
        epochs.append(batch["labels"][0].tolist())
        assert batch["labels"][1].tolist() == held[1]
    assert epochs[0] == corrupt(row, 0)[1] and epochs[1] == corrupt(row, 1)[1]
    assert epochs[0] == epochs[2] != epochs[1]


# --- span corruption -----------------------------------------------------------------------------------


def runs(mask: list[bool]) -> list[tuple[bool, int]]:
    return [(value, len(list(group))) for value, group in itertools.groupby(mask)]


@pytest.mark.parametrize("length", [2, 3, 7, 20, 33, 64, 100, 511])
def test_noise_mask_has_t5s_noise_and_span_counts(length: int):
    mask = masking.noise_span_mask(length, 0.15, 3.0, random.Random(length))
    noise = min(max(round(length * 0.15), 1), length - 1)
    spans = min(max(round(noise / 3.0), 1), length - noise)
    assert len(mask) == length and sum(mask) == noise
    pieces = runs(mask)
    # Non-noise first and noise last, alternating: T5's interleaving of the two segmentations.
    assert [value for value, _ in pieces] == [False, True] * spans
    assert masking.spans_needed(length, 0.15, 3.0) == spans + 1


def test_noise_segmentation_is_random_over_seeds():
    lengths = {tuple(n for _, n in runs(masking.noise_span_mask(100, 0.15, 3.0, random.Random(s)))) for s in range(30)}
    assert len(lengths) > 20
    # The mean span length is noise / spans = 15 / 5 = 3 in every draw.
    assert all(sum(lengths_[1::2]) == 15 and len(lengths_[1::2]) == 5 for lengths_ in lengths)


def reassemble(inputs: list[int], targets: list[int], sentinels: list[int], eos: int) -> list[int]:
    """T5's input with each sentinel replaced by what the target lists after that sentinel."""
    assert inputs[-1] == eos and targets[-1] == eos
    spans, current = {}, None
    for token in targets[:-1]:
        if token in sentinels:
            current = sentinels.index(token)
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out += spans[sentinels.index(token)] if token in sentinels else [token]
    return out


@pytest.mark.parametrize(
    "text", ["The quick brown fox jumps over the lazy dog.", "Day 12. Wind from the west, force 3.", "ab"]
)
def test_sentinel_input_and_target_reassemble_the_text_exactly(t5_tok, text: str):
    sentinels, eos = masking.sentinel_ids(t5_tok), t5_tok.eos_token_id
    ids = t5_tok(text, add_special_tokens=False)["input_ids"]
    for seed in range(5):
        mask = masking.noise_span_mask(len(ids), 0.15, 3.0, masking.row_rng(seed, 0, ids))
        inputs, targets = masking.corrupt_spans(ids, mask, sentinels, eos)
        spans = sum(1 for value, _ in runs(mask) if value)
        # Sentinels in order in both: the input holds 0..k-1, the target 0..k, the last closing the final span.
        assert [t for t in inputs if t in sentinels] == sentinels[:spans]
        assert [t for t in targets if t in sentinels] == sentinels[: spans + 1]
        assert targets[0] == sentinels[0] and targets[-2:] == [sentinels[spans], eos]
        assert len(targets) == sum(mask) + spans + 2 and len(inputs) == len(ids) - sum(mask) + spans + 1
        assert reassemble(inputs, targets, sentinels, eos) == ids
        assert t5_tok.decode(reassemble(inputs, targets, sentinels, eos)) == text


def test_prepared_span_rows_fit_max_length_and_restore_every_held_out_text(tmp_path, t5_tok):
    tok = t5_tok
    data = prepare_data(load_recipe(write_denoising_recipe(tmp_path, "span-corruption")), tok)
    sentinels = masking.sentinel_ids(tok)
    assert all(len(ids) <= 31 for ids in data.train["input_ids"])  # room left for the EOS the input ends with
    restored = [
        reassemble(i, t, sentinels, tok.eos_token_id)
        for i, t in zip(data.eval["input_ids"], data.eval["labels"], strict=True)
    ]
    texts = counting_corpus(6, start=3).strip().split("\n\n")
    assert [t for ids in restored for t in ids] == [
        t for x in texts for t in tok(x, add_special_tokens=False)["input_ids"]
    ]
    assert all(len(ids) <= 32 for ids in data.eval["input_ids"])


# --- recipe rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("objective", "override", "fragment"),
    [
        ("mlm", "data.packing=true", "data.packing: objective mlm cuts each text into rows itself"),
        ("mlm", "method={name: prefix}", "method prefix: virtual tokens and bottleneck adapters are not supported"),
        ("span-corruption", "method={name: adapter}", "method adapter: virtual tokens and bottleneck adapters"),
        ("mlm", "eval.metrics=[bleu]", "eval.metrics: bleu do not apply to objective mlm"),
        ("span-corruption", "objective.noise_density=0.9", "noise_density"),
        ("mlm", "objective.mlm_probability=0", "mlm_probability"),
    ],
)
def test_recipe_refuses_what_the_denoising_objectives_cannot_do(tmp_path, objective, override, fragment):
    with expect_error(fragment):
        load_recipe(write_denoising_recipe(tmp_path, objective), [override])


def test_chat_data_is_refused_for_mlm(tmp_path):
    path = write_denoising_recipe(tmp_path, "mlm")
    with expect_error("data.format: objective mlm corrupts plain text; set data.format: text"):
        load_recipe(path, ["data.format=chat"])


def test_metrics_default_to_accuracy_and_perplexity(tmp_path):
    assert load_recipe(write_denoising_recipe(tmp_path, "mlm")).eval.metrics == ["accuracy", "perplexity"]
    assert load_recipe(write_denoising_recipe(tmp_path, "span-corruption")).eval.metrics == ["perplexity", "accuracy"]


def test_a_generated_answer_keeps_its_sentinels_and_drops_other_special_tokens(t5_tok):
    from llmtune.generation import Sampling, _completion

    sentinels = masking.sentinel_ids(t5_tok)
    row = [sentinels[0], *t5_tok("from", add_special_tokens=False)["input_ids"], sentinels[1], t5_tok.eos_token_id]
    shown = set(sentinels)
    done = _completion([t5_tok.bos_token_id, *row, 5, 6], t5_tok, [t5_tok.eos_token_id], Sampling(), shown)
    assert done.text == "<extra_id_0>from<extra_id_1>" and done.finish_reason == "stop"
    # A tokenizer without sentinels decodes as before: every special token dropped.
    plain = _completion(row[1:], t5_tok, [t5_tok.eos_token_id], Sampling(), set())
    assert plain.text == "from"


def test_a_method_that_cannot_train_the_added_mask_token_is_refused_before_the_model_loads(tmp_path):
    from llmtune.run import finetune

    with expect_error("objective mlm needs tokens the tokenizer lacks ([MASK])", "method bitfit cannot train them"):
        finetune(write_denoising_recipe(tmp_path, "mlm", method={"name": "bitfit"}))
