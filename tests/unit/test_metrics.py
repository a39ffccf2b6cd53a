"""Metrics against their reference implementations and hand-computed values; response NLL on tiny:llama."""

from __future__ import annotations

import math

import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer

from llmtune import metrics
from llmtune.data import IGNORE_INDEX, Sample, encode
from llmtune.evaluation import response_nll
from llmtune.models import load_model, load_tokenizer

PREDICTIONS = ["the cats are running in the garden today", "a dog barks at the mailman every morning"]
REFERENCES = ["the cat runs in the garden today", "the dog barked at the postman every morning"]


# --- BLEU ----------------------------------------------------------------------------------------


def test_bleu_is_sacrebleu_corpus_bleu():
    expected = sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert 0 < expected < 100
    assert metrics.bleu(PREDICTIONS, REFERENCES) == pytest.approx(expected)
    # Corpus BLEU pairs each prediction with its own reference: swapping one side changes the score.
    assert metrics.bleu(PREDICTIONS, REFERENCES[::-1]) < expected


def test_bleu_short_answers_use_sacrebleu_defaults():
    # A corpus with no 4-grams scores 0 under plain corpus BLEU (sacrebleu's default, no effective order),
    # even when every answer is right; exact match is the metric for such short answers.
    predictions = references = ["yes", "no sir"]
    assert sacrebleu.corpus_bleu(predictions, [references]).score == 0.0
    assert metrics.bleu(predictions, references) == 0.0


def test_bleu_of_identical_text_is_100():
    assert metrics.bleu(REFERENCES, REFERENCES) == pytest.approx(100.0)


# --- ROUGE ---------------------------------------------------------------------------------------


def _mean_rouge_f1(use_stemmer: bool) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score(ref, pred) for pred, ref in zip(PREDICTIONS, REFERENCES, strict=True)]
    return {key: 100 * sum(s[key].fmeasure for s in scores) / len(scores) for key in ("rouge1", "rouge2", "rougeL")}


def test_rouge_is_stemmed_rouge_score_f1_averaged():
    expected = _mean_rouge_f1(use_stemmer=True)
    result = metrics.rouge(PREDICTIONS, REFERENCES)
    assert result.keys() == expected.keys()
    for key in expected:
        assert result[key] == pytest.approx(expected[key])
    # The example is chosen so that stemming matters (cats/cat, running/runs, barks/barked).
    assert expected["rouge1"] > _mean_rouge_f1(use_stemmer=False)["rouge1"]


def test_rouge_hand_computed():
    # Unigrams: precision 2/2, recall 2/3 -> F1 0.8; bigrams: 1/1 and 1/2 -> 2/3; LCS "the cat" -> 0.8.
    result = metrics.rouge(["the cat"], ["the cat sat"])
    assert result == pytest.approx({"rouge1": 80.0, "rouge2": 200 / 3, "rougeL": 80.0})


# --- exact match ---------------------------------------------------------------------------------


def test_exact_match_normalizes_whitespace_only():
    predictions = ["  Paris\n", "New   York", "paris", "Rome."]
    references = ["Paris", "New York", "Paris", "Rome"]
    # Whitespace is normalized; case and punctuation count.
    assert metrics.exact_match(predictions, references) == pytest.approx(50.0)
    assert metrics.exact_match(["a\tb c"], [" a b\n c "]) == 100.0


def test_exact_match_needs_equal_lengths():
    with pytest.raises(ValueError):
        metrics.exact_match(["a", "b"], ["a"])


# --- perplexity ----------------------------------------------------------------------------------


def test_perplexity_hand_computed():
    # Two tokens with probabilities 1/2 and 1/8: mean NLL = ln 4, perplexity 4.
    assert metrics.perplexity(math.log(2) + math.log(8), 2) == pytest.approx(4.0)


def test_perplexity_is_exp_of_mean_nll():
    nlls = [0.3, 1.7, 2.2, 0.05, 4.0]
    assert metrics.perplexity(sum(nlls), len(nlls)) == pytest.approx(math.exp(sum(nlls) / len(nlls)))


def test_perplexity_of_zero_tokens_is_an_error():
    with pytest.raises(ValueError):
        metrics.perplexity(0.0, 0)


# --- response NLL on tiny:llama ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny:llama").eval(), load_tokenizer("tiny:llama")


def _manual_nll(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """NLL of each loss-bearing label given the tokens before it, one unpadded row at a time."""
    with torch.no_grad():
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    positions = [t for t in range(1, len(ids)) if labels[t] != IGNORE_INDEX]
    return -sum(log_probs[t - 1, labels[t]].item() for t in positions), len(positions)


def test_response_nll_matches_manual_and_ignores_padding(tiny):
    model, tok = tiny
    pairs = [("short", "ok"), ("a much longer question", "a longer answer")]
    samples = [Sample(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in pairs]
    rows = [encode(s, tok) for s in samples]
    input_ids, labels = [r[0] for r in rows], [r[1] for r in rows]
    assert len(input_ids[0]) != len(input_ids[1])

    manual = [_manual_nll(model, ids, lab) for ids, lab in rows]
    expected_total = sum(nll for nll, _ in manual)
    expected_count = sum(n for _, n in manual)
    assert expected_count == len("ok") + len("a longer answer") + 2  # one byte per token, plus two EOS

    one_at_a_time = response_nll(model, tok, input_ids, labels, batch_size=1)
    padded = response_nll(model, tok, input_ids, labels, batch_size=2)
    assert one_at_a_time[1] == padded[1] == expected_count
    assert one_at_a_time[0] == pytest.approx(expected_total, rel=1e-5)
    assert padded[0] == pytest.approx(expected_total, rel=1e-5)
    assert metrics.perplexity(*padded) == pytest.approx(math.exp(expected_total / expected_count), rel=1e-5)
