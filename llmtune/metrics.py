"""Metrics as pure functions of numbers and strings. Every score but perplexity and margins is on a 0-100 scale."""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Callable


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp of the token-weighted mean negative log-likelihood (natural log) over loss-bearing tokens."""
    if n_tokens == 0:
        raise ValueError("perplexity over zero tokens")
    return math.exp(total_nll / n_tokens)


def bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU with its default 13a tokenizer, one reference per prediction."""
    import sacrebleu

    return sacrebleu.corpus_bleu(predictions, [references]).score


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (rouge-score, Porter stemming), times 100."""
    from rouge_score import rouge_scorer

    keys = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    totals = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for k in keys:
            totals[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: 100 * v / n for k, v in totals.items()}


def normalize_answer(text: str) -> str:
    """Strip ends and collapse inner whitespace; case and punctuation still count."""
    return re.sub(r"\s+", " ", text).strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Percentage of predictions equal to their reference after `normalize_answer`."""
    hits = sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references, strict=True))
    return 100 * hits / max(len(predictions), 1)


def preference_accuracy(chosen_logps: list[float], rejected_logps: list[float]) -> float:
    """Percentage of pairs whose chosen response is more likely than the rejected one; a tie is a miss."""
    if not chosen_logps:
        raise ValueError("preference accuracy over zero pairs")
    wins = sum(c > r for c, r in zip(chosen_logps, rejected_logps, strict=True))
    return 100 * wins / len(chosen_logps)


def mean_margin(chosen_logps: list[float], rejected_logps: list[float]) -> float:
    """Mean of log p(chosen) - log p(rejected) over pairs, in nats."""
    if not chosen_logps:
        raise ValueError("margin over zero pairs")
    return math.fsum(c - r for c, r in zip(chosen_logps, rejected_logps, strict=True)) / len(chosen_logps)


# --- rule-based rewards for RL (GRPO): one score per completion, 1.0 for right and 0.0 for wrong ------------


def exact_match_reward(completions: list[str], references: list[str]) -> list[float]:
    """1.0 where the completion equals its row's reference after `normalize_answer`."""
    return [float(normalize_answer(c) == normalize_answer(r)) for c, r in zip(completions, references, strict=True)]


def iso_date_reward(completions: list[str], references: list[str]) -> list[float]:
    """1.0 where the whole completion is a valid calendar date written YYYY-MM-DD (the reference is not used)."""
    return [float(_is_iso_date(c.strip())) for c in completions]


def _is_iso_date(text: str) -> bool:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return False
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def similarity_reward(completions: list[str], references: list[str]) -> list[float]:
    """difflib's ratio of matching characters between completion and reference, from 0 to 1: partial credit, so
    a model that is never exactly right still gets a signal to improve on."""
    import difflib

    return [
        difflib.SequenceMatcher(None, normalize_answer(c), normalize_answer(r)).ratio()
        for c, r in zip(completions, references, strict=True)
    ]


REWARDS: dict[str, Callable[[list[str], list[str]], list[float]]] = {
    "exact_match": exact_match_reward,
    "iso_date": iso_date_reward,
    "similarity": similarity_reward,
}


def accuracy(predictions: list[int], references: list[int]) -> float:
    """Percentage of predicted class indices equal to the reference."""
    hits = sum(p == r for p, r in zip(predictions, references, strict=True))
    return 100 * hits / max(len(predictions), 1)


def macro_f1(predictions: list[int], references: list[int], n_classes: int) -> float:
    """Unweighted mean over classes of per-class F1, times 100; a class never predicted nor present scores 0."""
    return macro_scores(predictions, references, n_classes)["f1"]


def macro_scores(predictions: list[int], references: list[int], n_classes: int) -> dict[str, float]:
    """Precision, recall and F1 of each class, each averaged over the classes unweighted, times 100. A class never
    predicted has precision 0, one never present recall 0, one neither F1 0: always guessing one class is
    penalised, and every declared class counts."""
    precision, recall, f1 = [], [], []
    for c in range(n_classes):
        tp = sum(p == c and r == c for p, r in zip(predictions, references, strict=True))
        predicted, actual = predictions.count(c), references.count(c)
        precision.append(tp / predicted if predicted else 0.0)
        recall.append(tp / actual if actual else 0.0)
        f1.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    n = max(n_classes, 1)
    return {"precision": 100 * sum(precision) / n, "recall": 100 * sum(recall) / n, "f1": 100 * sum(f1) / n}


def entity_scores(predictions: list[list[str]], references: list[list[str]], scheme: str) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 (seqeval), times 100: an entity counts when its type and its
    span of words both match.

    Args:
        scheme: 'iob2' (BIO): strict, an entity starts at B- only, and an I- that continues no entity of its type
            is no entity; 'iob1': conlleval's rules, as CoNLL-2003 was scored: an I- after O or another type
            starts one too.
    """
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    mode = {"mode": "strict", "scheme": IOB2} if scheme == "iob2" else {}
    scores = {"precision": precision_score, "recall": recall_score, "f1": f1_score}
    # zero_division: no entity predicted (or none present) scores 0, without seqeval's warning.
    return {name: 100 * float(fn(references, predictions, zero_division=0, **mode)) for name, fn in scores.items()}
