"""An OpenAI-compatible HTTP server over one model: chat and text completions (streamed or not), batched.

One worker thread owns the model. Requests wait in a queue; each time the worker is free it takes the oldest
request and every waiting one that samples the same way, runs them as one batched `generate`, and answers each.
Streamed requests receive their text step by step from inside that batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from transformers.generation.streamers import BaseStreamer

from llmtune.errors import LLMTuneError, first_line
from llmtune.generation import Completion, Generator, Sampling, load_generator
from llmtune.templates import stop_token_ids

# Completion length when a request names none: the rest of the context, but no more than this, so a client that
# forgets max_tokens does not hold the worker for thousands of steps.
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_BATCH_SIZE = 16
BATCH_WINDOW_S = 0.02  # how long a batch waits for more requests to join it: small beside any generation
_log = logging.getLogger("llmtune.serve")

# OpenAI fields that would change the answer (penalties, tools, log probabilities, JSON mode): accepted only at
# the value that leaves it as it is, so a client never gets an answer computed without a setting it asked for.
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
    "logprobs": (False,),  # also matches 0
    "top_logprobs": (0,),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "echo": (False,),
    "suffix": ("",),
}


# --- requests --------------------------------------------------------------------------------------


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]
    name: str | None = None  # accepted; chat templates have no place for it

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Request(BaseModel):
    """The fields both endpoints share; a field not declared here is refused by name."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0)] = 1.0  # OpenAI's default: clients that omit it expect sampling
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    # Harmless: they change nothing in the answer.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # Checked against _NEUTRAL_VALUES.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # Not OpenAI's: fields vLLM takes beside them (clients send them as extra body fields), read as vLLM reads them.
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: every token
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    use_beam_search: bool = False  # the beam width is best_of, as in vLLM's sampling parameters
    best_of: Annotated[int, Field(ge=1)] | None = None
    num_beams: Annotated[int, Field(ge=1)] | None = None  # transformers' and `llmtune generate`'s name for the width

    def stop_texts(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            if not self.stop:
                raise _APIError(400, "stop: a stop text must not be empty", "stop")
            return (self.stop,)
        return tuple(self.stop)


class _ChatRequest(_Request):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # newer clients' name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class _CompletionRequest(_Request):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None


class _APIError(Exception):
    """A request the server refuses, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = "invalid_request_error" if status < 500 else "server_error"


def _failure(e: BaseException) -> _APIError:
    """An unexpected exception as a one-line 500; the traceback goes to the server's log."""
    _log.error("request failed", exc_info=e)
    return _APIError(500, f"{type(e).__name__}: {first_line(e)}")


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _parse(raw: bytes, schema: type[_Request]) -> _Request:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _APIError(400, f"the request body is not valid JSON: {first_line(e)}") from None
    try:
        request = schema.model_validate(body)
    except ValidationError as e:
        problem = e.errors()[0]
        param = ".".join(str(p) for p in problem["loc"]) or None
        if problem["type"] == "extra_forbidden":
            raise _APIError(400, f"unrecognized request argument supplied: {param}", param) from None
        raise _APIError(400, f"{param or 'body'}: {problem['msg']}", param) from None
    for name, neutral in _NEUTRAL_VALUES.items():
        value = getattr(request, name, None)
        if value is not None and value not in neutral:
            raise _APIError(400, f"{name}={json.dumps(value)} is not supported by this server", name)
    beams = beam_width(request)
    if beams == 1 and request.best_of not in (None, 1, request.n):
        message = f"best_of={request.best_of} goes with use_beam_search (its beam width); leave it out or set it to n"
        raise _APIError(400, message, "best_of")
    if beams > 1 and request.stream:
        message = f"stream: beam search (width {beams}) knows its answer only at the end; set stream to false"
        raise _APIError(400, message, "stream")
    if beams > 1 and request.n > 1:
        message = f"n={request.n}: beam search (width {beams}) returns its one best beam; set n to 1"
        raise _APIError(400, message, "n")
    return request


def beam_width(request: _Request) -> int:
    """How many beams the request searches with: num_beams, or best_of under vLLM's use_beam_search; 1 for none."""
    if not request.use_beam_search:
        return request.num_beams or 1
    if request.best_of is None and request.num_beams is None:
        raise _APIError(
            400, "use_beam_search: give the beam width as best_of (as vLLM takes it) or num_beams", "best_of"
        )
    if None not in (request.best_of, request.num_beams) and request.best_of != request.num_beams:
        message = f"best_of={request.best_of} and num_beams={request.num_beams} both set the beam width; give one"
        raise _APIError(400, message, "num_beams")
    return request.num_beams or request.best_of


# --- the worker ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """One HTTP request's rows (its prompts, each repeated n times), and where its answers go."""

    prompts: list[list[int]]
    sampling: Sampling
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def post(self, *event: Any) -> None:
        """Called from the worker thread: hand an event to the request's coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass

    async def result(self) -> list[Completion]:
        kind, value = await self.events.get()
        if kind == "error":
            raise _failure(value)
        return value


class _Row:
    def __init__(self, send: Callable[[str], None]):
        self.send = send
        self.tokens: list[int] = []
        self.sent = ""
        self.done = False


class _BatchStreamer(BaseStreamer):
    """A transformers streamer for a whole batch: each step's tokens arrive together, one per row.

    It sends each streamed row's text as it grows, holding back what the final completion might still change: an
    incomplete UTF-8 character, trailing whitespace (completions are stripped) and the start of a stop text. What is
    sent is therefore always a prefix of the finished completion, and the worker sends the rest when it is done.
    """

    def __init__(self, rows: list[_Row | None], tokenizer, stop_texts: tuple[str, ...], lock: threading.Lock):
        self.rows, self.tokenizer, self.stop_texts, self.lock = rows, tokenizer, stop_texts, lock
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate first hands over the prompt itself
            self.prompt_seen = True
            return
        for row, tokens in zip(self.rows, value.reshape(len(self.rows), -1).tolist(), strict=True):
            if row is None or row.done:
                continue
            for token in tokens:
                if token in self.stop_ids:
                    row.done = True
                    break
                row.tokens.append(token)
            with self.lock:
                text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            visible, stopped = settled_text(text, self.stop_texts)
            row.done = row.done or stopped
            if len(visible) > len(row.sent) and visible.startswith(row.sent):
                row.send(visible[len(row.sent) :])
                row.sent = visible

    def end(self) -> None:
        """Nothing to flush: the worker sends each row's rest from its finished completion."""


def settled_text(text: str, stop_texts: tuple[str, ...]) -> tuple[str, bool]:
    """The part of a growing completion that no later token can change, and whether a stop text has ended it."""
    cuts = [text.find(s) for s in stop_texts if s in text]
    if cuts:
        return text[: min(cuts)].strip(), True
    text = text.rstrip("\ufffd")
    held = max((k for s in stop_texts for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held].strip(), False


class Batcher:
    """The worker thread that owns the model, and the queue of requests waiting for it."""

    def __init__(self, generator: Generator, max_batch_size: int):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.tokenizer_lock = threading.Lock()  # the endpoints encode while the worker decodes
        self.batches = 0
        self.requests = 0
        self._queue: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="llmtune-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    def submit(self, job: _Job) -> None:
        with self._wake:
            self._queue.append(job)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _take(self) -> list[_Job]:
        """The oldest job and the ones that sample as it does, waiting or arriving within BATCH_WINDOW_S, up to
        max_batch_size rows in all.

        A seeded job runs alone: its random draws then depend on its own rows only, so it repeats exactly.
        """
        with self._wake:
            while not self._queue and not self._stopping:
                self._wake.wait()
            if self._stopping:
                return []
            first = self._queue.popleft()
            batch, rows = [first], len(first.prompts)
            if first.sampling.seed is not None:
                return batch
            # The clients of the batch just answered are sending their next requests: wait a moment for them, or
            # they miss this batch and the two halves of the load alternate in half-full batches from then on.
            deadline = time.monotonic() + BATCH_WINDOW_S
            while True:
                for job in list(self._queue):
                    if job.sampling == first.sampling and rows + len(job.prompts) <= self.max_batch_size:
                        self._queue.remove(job)
                        batch.append(job)
                        rows += len(job.prompts)
                left = deadline - time.monotonic()
                if rows >= self.max_batch_size or left <= 0 or self._stopping:
                    return batch
                self._wake.wait(left)

    def _work(self) -> None:
        while batch := self._take():
            self._run(batch)

    def _run(self, batch: list[_Job]) -> None:
        sampling = batch[0].sampling
        prompts = [p for job in batch for p in job.prompts]
        rows: list[_Row | None] = []
        for job in batch:
            for i in range(len(job.prompts)):
                rows.append(_Row(lambda text, job=job, i=i: job.post("delta", (i, text))) if job.stream else None)
        streamer = None
        if any(rows):
            streamer = _BatchStreamer(rows, self.generator.tokenizer, sampling.stop, self.tokenizer_lock)
        try:
            completions = self.generator.generate(prompts, sampling, batch_size=len(prompts), streamer=streamer)
        except Exception as e:  # every request of the batch gets the error; the worker serves the next batch
            for job in batch:
                job.post("error", e)
            return
        # Counted before anyone is answered, so a client that asks /health next sees its own request.
        self.batches += 1
        self.requests += len(batch)
        start = 0
        for job in batch:
            end = start + len(job.prompts)
            for i, (row, completion) in enumerate(zip(rows[start:end], completions[start:end], strict=True)):
                if row is not None and len(completion.text) > len(row.sent):
                    job.post("delta", (i, completion.text[len(row.sent) :]))
            job.post("done", completions[start:end])
            start = end


# --- the HTTP side ---------------------------------------------------------------------------------


def _sampling(request: _Request, prompt_lengths: list[int], context: int | None) -> Sampling:
    """The request's sampling settings, its completion length checked against the model's context."""
    max_tokens = request.max_tokens
    if isinstance(request, _ChatRequest) and request.max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != request.max_completion_tokens:
            raise _APIError(400, "max_tokens and max_completion_tokens differ; give one of them", "max_tokens")
        max_tokens = request.max_completion_tokens
    longest = max(prompt_lengths)
    param = "messages" if isinstance(request, _ChatRequest) else "prompt"
    if context is not None:
        if max_tokens is None and longest >= context:
            raise _APIError(
                400,
                f"This model's maximum context length is {context} tokens, but the prompt has {longest} tokens. "
                "Shorten the prompt.",
                param,
                "context_length_exceeded",
            )
        if max_tokens is not None and longest + max_tokens > context:
            raise _APIError(
                400,
                f"This model's maximum context length is {context} tokens, but you requested {longest + max_tokens} "
                f"tokens ({longest} in the prompt, {max_tokens} for the completion). "
                "Shorten the prompt or lower max_tokens.",
                param,
                "context_length_exceeded",
            )
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, context - longest) if context is not None else DEFAULT_MAX_TOKENS
    beams = beam_width(request)
    # A beam search whose client left temperature out searches best-first: OpenAI's default of 1 is there for
    # clients that expect sampling, and beam sampling must be asked for.
    explicit = "temperature" in request.model_fields_set
    return Sampling(
        max_new_tokens=max_tokens,
        temperature=request.temperature if beams == 1 or explicit else 0.0,
        top_k=request.top_k if request.top_k and request.top_k > 0 else None,
        top_p=request.top_p if request.top_p < 1 else None,
        stop=request.stop_texts(),
        seed=request.seed,
        num_beams=beams,
        repetition_penalty=request.repetition_penalty,
    )


def _usage(prompt_lengths: list[int], completions: list[Completion]) -> dict[str, int]:
    prompt, generated = sum(prompt_lengths), sum(c.tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(generator: Generator, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> FastAPI:
    """The FastAPI application serving `generator`; its worker thread runs while the application does."""
    batcher = Batcher(generator, max_batch_size)

    @asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title=f"llmtune serve {generator.name}", lifespan=lifespan)
    app.state.batcher = batcher
    created = int(time.time())

    def error_response(e: _APIError) -> JSONResponse:
        return JSONResponse(_error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(_APIError)
    async def _refused(_request, e: _APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http(_request, e: HTTPException):
        return JSONResponse(_error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.middleware("http")
    async def _unexpected(request: Request, call_next):
        # Caught here rather than by an exception handler for Exception, which Starlette answers and then re-raises,
        # dropping the connection under the client.
        try:
            return await call_next(request)
        except Exception as e:
            return error_response(_failure(e))

    def check_model(request: _Request) -> None:
        if request.model != generator.name:
            raise _APIError(
                404,
                f"The model '{request.model}' does not exist; this server serves '{generator.name}'",
                "model",
                "model_not_found",
            )

    def check_n(request: _Request, prompts: int) -> None:
        if request.n * prompts > max_batch_size:
            raise _APIError(
                400,
                f"n: {request.n} choices of {prompts} prompt(s) exceed this server's batch of {max_batch_size} rows",
                "n",
            )

    async def encode(fn: Callable[[Any], list[int]], what: Any, param: str) -> list[int]:
        def run() -> list[int]:
            with batcher.tokenizer_lock:
                return fn(what)

        try:
            return await asyncio.to_thread(run)
        except LLMTuneError as e:
            raise _APIError(400, f"{param}: {first_line(e)}", param) from None
        except Exception as e:  # a chat template that raises on this conversation (roles out of order, ...)
            raise _APIError(400, f"{param}: the prompt could not be formatted: {first_line(e)}", param) from None

    def submit(prompts: list[list[int]], request: _Request, sampling: Sampling) -> _Job:
        job = _Job([p for p in prompts for _ in range(request.n)], sampling, request.stream, asyncio.get_running_loop())
        batcher.submit(job)
        return job

    def stream(job: _Job, chunk: Callable[..., dict[str, Any]], lengths: list[int], request: _Request):
        async def events() -> AsyncIterator[str]:
            for i in range(len(job.prompts)):
                if (opening := chunk(i, None, None)) is not None:
                    yield _sse(opening)
            while True:
                kind, value = await job.events.get()
                if kind == "delta":
                    yield _sse(chunk(*value, None))
                elif kind == "error":  # the response has begun: the error goes in the stream, as OpenAI sends it
                    error = _failure(value)
                    yield _sse(_error_body(error.message, error.kind))
                    break
                else:
                    for i, completion in enumerate(value):
                        yield _sse(chunk(i, "", completion.finish_reason))
                    if request.stream_options is not None and request.stream_options.include_usage:
                        yield _sse({**chunk(0, "", None), "choices": [], "usage": _usage(lengths, value)})
                    break
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        request = _parse(await http.body(), _ChatRequest)
        check_model(request)
        check_n(request, 1)
        prompt = await encode(generator.encode, [m.as_dict() for m in request.messages], "messages")
        job = submit([prompt], request, _sampling(request, [len(prompt)], generator.context_length))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": generator.name}
        if request.stream:

            def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            return stream(job, chunk, [len(prompt)], request)
        completions = await job.result()
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(completions)
        ]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage([len(prompt)], completions)}

    @app.post("/v1/completions")
    async def completions(http: Request):
        request = _parse(await http.body(), _CompletionRequest)
        check_model(request)
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        check_n(request, len(texts))
        prompts = [await encode(generator.encode_text, text, "prompt") for text in texts]
        lengths = [len(p) for p in prompts]
        job = submit(prompts, request, _sampling(request, lengths, generator.context_length))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": generator.name}
        if request.stream:

            def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any] | None:
                if text is None:  # text completions have no opening chunk
                    return None
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                return {**head, "object": "text_completion", "choices": [choice]}

            return stream(job, chunk, lengths, request)
        answers = await job.result()
        choices = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(answers)
        ]
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(lengths, answers)}

    model_card = {"id": generator.name, "object": "model", "created": created, "owned_by": "llmtune"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != generator.name:
            raise _APIError(404, f"The model '{model}' does not exist", "model", "model_not_found")
        return model_card

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": generator.name,
            "requests_served": batcher.requests,
            "batches": batcher.batches,
            "waiting": batcher.waiting,
        }

    return app


def serve(
    target: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    announce: Callable[[str], None] = print,
) -> None:
    """Serve a run directory's tuned model or any model reference over HTTP until interrupted."""
    import uvicorn

    if max_batch_size < 1:
        raise LLMTuneError(f"--max-batch-size {max_batch_size}: give at least 1")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))  # before the model loads, so a taken port fails at once
    except OSError as e:
        sock.close()
        raise LLMTuneError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or --host") from None
    try:
        generator = load_generator(target)
    except BaseException:
        sock.close()
        raise
    sock.listen(128)  # clients that connect before uvicorn has started wait in the backlog, not refused
    server = uvicorn.Server(uvicorn.Config(build_app(generator, max_batch_size), log_level="warning"))
    announce(f"serving {generator.name} on http://{host}:{port}/v1 (OpenAI-compatible)")
    server.run(sockets=[sock])
