"""`llmtune chat` in a real pseudo-terminal: streamed answers equal the library's, turns build on each other,
commands work, and /exit ends the program cleanly."""

from __future__ import annotations

import os
import re
import sys

import pexpect
import pytest

from llmtune.generation import Sampling, load_generator

SAMPLING = Sampling(max_new_tokens=6)
PROMPT = ">>> "


@pytest.fixture(scope="module")
def generator():
    return load_generator("tiny:llama")


def _answer(generator, messages) -> str:
    [c] = generator.generate([generator.encode(messages)], SAMPLING)
    return c.text


def _reply(child) -> str:
    """The text the terminal showed between the sent line and the next prompt."""
    child.expect_exact(PROMPT)
    return re.sub(r"\s+", " ", child.before.replace("\r", "")).strip()


def _spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "NO_COLOR": "1"}
    return pexpect.spawn(
        sys.executable,
        ["-m", "llmtune", "chat", "tiny:llama", "--max-new-tokens", "6", *args],
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 400),
    )


def _said(child, line: str) -> str:
    child.sendline(line)
    child.expect_exact(line)  # the terminal echoes the line
    return _reply(child)


def test_chat_streams_answers_that_follow_the_conversation(generator):
    child = _spawn()
    child.expect_exact("llmtune chat: tiny:llama")
    child.expect_exact(PROMPT)
    first = _said(child, "hello")
    expected = _answer(generator, [{"role": "user", "content": "hello"}])
    assert expected.strip()  # an empty answer would prove nothing below
    assert first.startswith(re.sub(r"\s+", " ", expected).strip())
    second = _said(child, "and again")
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": "and again"},
    ]
    assert second.startswith(re.sub(r"\s+", " ", _answer(generator, conversation)).strip())
    assert "system: Be terse." in _said(child, "/system Be terse.")
    terse = _said(child, "hello")
    system = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello"}]
    assert terse.startswith(re.sub(r"\s+", " ", _answer(generator, system)).strip())
    assert "(conversation cleared)" in _said(child, "/reset")
    assert "/system TEXT" in _said(child, "/help")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
