"""Chat-template masking on the builtin pretrained model's tokenizer (slow: converts the model once)."""

from __future__ import annotations

import pytest
from helpers import (
    assert_prompt_matches_training,
    convo,
    loss_spans,
    plain_ids,
    rendered,
)

from llmtune.data import (
    Sample,
    encode,
)
from llmtune.models import load_tokenizer


@pytest.mark.slow
def test_builtin_tokenizer_masking():
    tok = load_tokenizer("builtin:smollm2-135m-instruct")
    assert tok.pad_token_id == tok.eos_token_id
    for messages in (convo("hi there", "Hello, friend."), convo("q1", "2029-01-29", "q2", " spaced out", system="S")):
        sample = Sample(messages=messages)
        ids, labels = encode(sample, tok)
        # SmolLM2's BOS is <|im_start|>: the ids are the rendered conversation, with nothing added.
        assert ids == plain_ids(tok, rendered(tok, messages))
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [tok.decode(ids[a:b]) for a, b in loss_spans(labels)] == [a + tok.eos_token for a in answers]
        assert_prompt_matches_training(sample, tok)
