"""`llmtune chat`: a multi-turn conversation in the terminal, formatted with the run's chat template."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llmtune.errors import LLMTuneError
from llmtune.generation import Generator, Sampling

if TYPE_CHECKING:
    from transformers.generation.streamers import BaseStreamer

HELP = """commands:
  /reset        start the conversation over (the system message stays)
  /system TEXT  set the system message and start over; /system alone goes back to the default
  /help         this list
  /exit         quit (or Ctrl-D); Ctrl-C stops an answer while it is being written"""


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" or "length" (cut at max_new_tokens)
    dropped: int  # the oldest turns (user message + answer) dropped so the conversation fits the context


@dataclass
class ChatSession:
    """A conversation with a model: the history it remembers, trimmed to fit its context window."""

    generator: Generator
    sampling: Sampling = field(default_factory=Sampling)
    system: str | None = None  # None: the recipe's system prompt, if it had one (Generator.encode adds it)
    history: list[dict[str, str]] = field(default_factory=list)  # user and assistant messages, oldest first

    def send(self, text: str, streamer: BaseStreamer | None = None) -> Reply:
        """The model's answer to `text` after the conversation so far; the exchange joins the history.

        When prompt + max_new_tokens would not fit the context, the oldest turns are dropped (for good) first.
        """
        user = {"role": "user", "content": text}
        history = self.history
        dropped = 0
        while not self._fits(ids := self.generator.encode(self._messages([*history, user]))):
            if not history:
                raise LLMTuneError(
                    f"that message is {len(ids)} tokens; with max_new_tokens {self.sampling.max_new_tokens} it does "
                    f"not fit the {self.generator.context_length}-token context: send a shorter one"
                )
            history = history[2:]
            dropped += 1
        [completion] = self.generator.generate([ids], self.sampling, streamer=streamer)
        self.history = [*history, user, {"role": "assistant", "content": completion.text}]
        return Reply(completion.text, completion.finish_reason, dropped)

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        """A new system message starts the conversation over: the earlier answers followed the old one."""
        self.system = text or None
        self.reset()

    @property
    def system_message(self) -> str | None:
        """The system message the model sees."""
        return self.system or (self.generator.system_prompt if self.generator.chat else None)

    def _messages(self, turns: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, *turns] if self.system else turns

    def _fits(self, ids: list[int]) -> bool:
        limit = self.generator.context_length
        return limit is None or len(ids) + self.sampling.max_new_tokens <= limit


def chat(target: str, sampling: Sampling, system: str | None = None) -> None:
    """Load a run directory or model and talk with it in the terminal until /exit or end of input."""
    from llmtune.generation import load_generator

    session = ChatSession(load_generator(target), sampling, system)
    repl(session, input, print)


def repl(session: ChatSession, read: Callable[[str], str], write: Callable[..., None]) -> None:
    """Read lines, run commands, stream answers; Ctrl-C while answering stops that answer only."""
    from transformers import TextStreamer

    _enable_line_editing()
    gen = session.generator
    context = f"{gen.context_length}-token context" if gen.context_length else "context of unknown length"
    template = "chat template" if gen.chat else "no chat template: turns are joined as plain text"
    write(f"llmtune chat: {gen.name} ({template}, {context})")
    if session.system_message:
        write(f"system: {session.system_message}")
    write("/help for commands, /exit or Ctrl-D to quit")
    while True:
        try:
            line = read(">>> ").strip()
        except EOFError:
            write()
            return
        except KeyboardInterrupt:
            write()
            continue
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, write):
                return
            continue
        try:
            reply = session.send(line, TextStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True))
        except KeyboardInterrupt:
            write("\n(stopped; this exchange is not kept)")
            continue
        except LLMTuneError as e:
            write(f"error: {e}")
            continue
        if reply.finish_reason == "length":
            write(f"(cut at {session.sampling.max_new_tokens} tokens; raise --max-new-tokens for longer answers)")
        if reply.dropped:
            turns = "turn" if reply.dropped == 1 else "turns"
            write(f"note: dropped the oldest {reply.dropped} {turns} to fit the {context}")


def _command(session: ChatSession, line: str, write: Callable[..., None]) -> bool:
    """Run a /command; False ends the chat."""
    name, _, argument = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        session.reset()
        write("(conversation cleared)")
    elif name == "/system":
        session.set_system(argument.strip())
        write(f"system: {session.system_message}" if session.system_message else "(no system message)")
        write("(conversation cleared)")
    elif name == "/help":
        write(HELP)
    else:
        write(f"unknown command {name}; /help lists them")
    return True


def _enable_line_editing() -> None:
    """Arrow keys and history for input(), where the readline module exists (not on Windows)."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on)
    except ImportError:
        pass
