"""ChatSession without a terminal: multi-turn prompts, system messages, trimming to the context, the command loop."""

from __future__ import annotations

import pytest
import torch
from helpers import expect_error

from llmtune.chat import ChatSession, repl
from llmtune.generation import Generator, Sampling
from llmtune.models import load_model, load_tokenizer

SAMPLING = Sampling(max_new_tokens=4)


@pytest.fixture(scope="module")
def generator():
    torch.manual_seed(0)
    model = load_model("tiny:llama")
    # A small window, so a few byte-level turns (one token per character) overflow it.
    model.config.max_position_embeddings = 160
    return Generator(model, load_tokenizer("tiny:llama"), "tiny", chat=True, system_prompt="Recipe system.")


def _answer(generator, messages):
    [c] = generator.generate([generator.encode(messages)], SAMPLING)
    return c.text


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


def test_each_answer_is_generated_after_the_conversation_so_far(generator, monkeypatch):
    prompts = []
    real = Generator.generate
    monkeypatch.setattr(Generator, "generate", lambda self, p, *a, **k: prompts.extend(p) or real(self, p, *a, **k))
    session = ChatSession(generator, SAMPLING)
    first = session.send("hello")
    assert first.text == _answer(generator, [_user("hello")]) and first.dropped == 0
    second = session.send("and again")
    conversation = [_user("hello"), _assistant(first.text), _user("and again")]
    assert second.text == _answer(generator, conversation)
    assert prompts[2] == generator.encode(conversation)  # [0]: the first send, [1]: _answer above
    assert generator.tokenizer.decode(prompts[2]).count("<|im_start|>user") == 2
    assert session.history == [_user("hello"), _assistant(first.text), _user("and again"), _assistant(second.text)]


def test_system_message_replaces_the_recipe_one_and_starts_over(generator):
    session = ChatSession(generator, SAMPLING)
    assert session.system_message == "Recipe system."  # the recipe's, added by Generator.encode
    session.send("hello")
    session.set_system("Answer in French.")
    assert session.history == [] and session.system_message == "Answer in French."
    reply = session.send("hello")
    system = {"role": "system", "content": "Answer in French."}
    assert reply.text == _answer(generator, [system, _user("hello")])
    session.send("more")
    session.reset()
    assert session.history == [] and session.system_message == "Answer in French."
    session.set_system("")
    assert session.system_message == "Recipe system."


def test_the_oldest_turns_are_dropped_to_fit_the_context(generator):
    session = ChatSession(generator, SAMPLING)
    limit = generator.context_length - SAMPLING.max_new_tokens
    replies = []
    for i in range(4):
        before, user = list(session.history), _user(f"{i} " + "ab " * 16)
        reply = session.send(user["content"])
        replies.append(reply)
        kept = [*before[2 * reply.dropped :], user]
        assert session.history == [*kept, _assistant(reply.text)]
        assert len(generator.encode(kept)) <= limit
        if reply.dropped:  # no fewer turns dropped would have fitted
            assert len(generator.encode([*before[2 * (reply.dropped - 1) :], user])) > limit
        assert reply.text == _answer(generator, kept)
    assert replies[0].dropped == 0 and any(r.dropped for r in replies)


def test_a_message_too_long_alone_is_refused_and_the_history_kept(generator):
    session = ChatSession(generator, SAMPLING)
    session.send("hello")
    before = list(session.history)
    with expect_error("that message is", "160-token context", "send a shorter one"):
        session.send("ab " * 60)
    assert session.history == before


def test_the_loop_runs_commands_and_survives_an_interrupted_answer(generator):
    class Interrupting:
        def put(self, value):
            raise KeyboardInterrupt

        def end(self):
            pass

    lines = iter(["hello", "/help", "/bogus", "/system Be terse.", "hi", "/reset", "/exit", "never read"])
    written = []
    session = ChatSession(generator, SAMPLING)
    sends = []

    def send(text, streamer=None, real=session.send):
        sends.append(text)
        return real(text, Interrupting() if text == "hi" else None)

    session.send = send
    repl(session, lambda prompt: next(lines), lambda *a: written.append(" ".join(map(str, a))))
    out = "\n".join(written)
    assert out.startswith("llmtune chat: tiny (chat template, 160-token context)\nsystem: Recipe system.")
    assert "/system TEXT" in out and "unknown command /bogus" in out and "system: Be terse." in out
    assert "(stopped; this exchange is not kept)" in out
    assert sends == ["hello", "hi"] and session.history == []
    assert next(lines) == "never read"  # /exit ended the loop


def test_end_of_input_ends_the_loop(generator):
    def read(prompt):
        raise EOFError

    repl(ChatSession(generator, SAMPLING), read, lambda *a: None)
