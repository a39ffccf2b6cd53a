"""`llmtune serve`: the OpenAI-compatible server over tiny:llama, spoken to through the official `openai` client.

One server runs for the whole module, in a background thread on a free port; every test talks to it over HTTP.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from helpers import free_port
from typer.testing import CliRunner

from llmtune.cli.app import app
from llmtune.errors import LLMTuneError
from llmtune.generation import Sampling, load_generator
from llmtune.serve import build_app, settled_text

MODEL = "tiny:llama"
HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def server(one_torch_thread):
    generator = load_generator(MODEL)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(build_app(generator, max_batch_size=16), port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "the server stopped while starting"
        time.sleep(0.02)
    yield generator, f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0)


def health(server) -> dict:
    with urllib.request.urlopen(f"{server[1]}/health") as response:
        return json.load(response)


def chat(client, messages=HI, **options) -> str:
    options = {"temperature": 0, "max_tokens": 12, **options}
    return client.chat.completions.create(model=MODEL, messages=messages, **options).choices[0].message.content


def streamed(client, messages=HI, **options) -> tuple[str, list[str | None]]:
    """The joined text of a streamed chat completion, and each chunk's finish_reason."""
    options = {"temperature": 0, "max_tokens": 12, **options}
    text, finishes = [], []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True, **options):
        assert chunk.object == "chat.completion.chunk" and chunk.model == MODEL
        text.append(chunk.choices[0].delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
    return "".join(text), finishes


def test_chat_matches_the_library_and_streaming_matches_chat(server, client):
    generator, _ = server
    answer = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=12)
    [expected] = generator.generate([generator.encode(HI)], Sampling(max_new_tokens=12))
    assert answer.object == "chat.completion" and answer.model == MODEL
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected.text
    assert answer.choices[0].finish_reason == expected.finish_reason
    assert answer.usage.prompt_tokens == len(generator.encode(HI))
    assert answer.usage.completion_tokens == expected.tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + expected.tokens

    text, finishes = streamed(client)
    assert text == expected.text
    assert len(finishes) > 3  # the text came in pieces, not in one final chunk
    assert finishes[-1] == expected.finish_reason and set(finishes[:-1]) == {None}


def test_streamed_usage_is_the_last_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HI, temperature=0, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_max_tokens_ends_with_length_and_counts_tokens(client):
    answer = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 3


def test_completions_take_raw_text_and_a_list_of_prompts_with_n(server, client):
    generator, _ = server
    prompts = ["The sky is", "Once upon"]
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert answer.object == "text_completion"
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    expected = generator.generate([generator.encode_text(p) for p in prompts], Sampling(max_new_tokens=6))
    assert [c.text for c in answer.choices] == [expected[0].text] * 2 + [expected[1].text] * 2
    assert answer.usage.prompt_tokens == sum(len(generator.encode_text(p)) for p in prompts)
    assert answer.usage.completion_tokens == 2 * sum(e.tokens for e in expected)

    pieces = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == expected[0].text


def test_models_lists_the_one_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "llmtune"


def test_n_samples_distinct_choices_and_a_seed_repeats_them(client):
    def sample(seed: int) -> list[str]:
        answer = client.chat.completions.create(
            model=MODEL, messages=HI, temperature=1.0, max_tokens=10, n=2, seed=seed
        )
        return [c.message.content for c in answer.choices]

    first = sample(7)
    assert len(first) == 2 and first[0] != first[1]
    assert sample(7) == first
    assert sample(8) != first


def test_stop_text_ends_the_completion_before_it(client):
    full = chat(client, max_tokens=16)
    # A character from the middle of the greedy answer, that is not a replacement character or whitespace.
    stop = next(ch for ch in full[3:] if ch.strip() and ch != "\ufffd")
    expected = full[: full.find(stop)].strip()
    answer = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=16, stop=[stop, "@@"])
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens < 16
    text, finishes = streamed(client, max_tokens=16, stop=stop)
    assert text == expected and finishes[-1] == "stop"


def test_settled_text_holds_back_what_may_still_change():
    assert settled_text(" ab\ufffd", ()) == ("ab", False)  # an incomplete UTF-8 character
    assert settled_text("ab  ", ()) == ("ab", False)  # trailing space: completions are stripped
    assert settled_text("abc<e", ("<end>",)) == ("abc", False)  # maybe the start of a stop text
    assert settled_text("abc<end>xyz", ("<end>", "c<")) == ("ab", True)  # the earliest stop text wins


def test_concurrent_requests_are_batched_and_answer_as_alone(server, client):
    prompts = [[{"role": "user", "content": "question " + "x" * i}] for i in range(8)]
    alone = [chat(client, p, max_tokens=24) for p in prompts]
    before = health(server)
    start = threading.Barrier(8)

    def ask(i: int) -> str:
        start.wait()
        # Half of them stream: their rows share the batch with the others.
        return streamed(client, prompts[i], max_tokens=24)[0] if i % 2 else chat(client, prompts[i], max_tokens=24)

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    after = health(server)
    assert together == alone
    assert after["requests_served"] - before["requests_served"] == 8
    assert after["batches"] - before["batches"] < 8
    assert after["status"] == "ok" and after["model"] == MODEL


def test_beams_top_k_and_repetition_penalty_as_vllm_takes_them(server, client):
    generator, _ = server
    hello = [{"role": "user", "content": "hello there"}]
    prompt = [generator.encode(hello)]

    def library(**options) -> str:
        return generator.generate(prompt, Sampling(max_new_tokens=12, **options))[0].text

    beams = library(num_beams=3)
    assert beams != library()  # beam search answers otherwise than greedy here, so the checks below can fail
    # No temperature given: the search is best-first, not OpenAI's default sampling at 1.
    answer = client.chat.completions.create(model=MODEL, messages=hello, max_tokens=12, extra_body={"num_beams": 3})
    assert answer.choices[0].message.content == beams
    vllm = {"use_beam_search": True, "best_of": 3}
    assert chat(client, hello, extra_body=vllm) == beams
    text = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, extra_body=vllm).choices[0].text
    assert text == generator.generate([generator.encode_text("The sky is")], Sampling(6, num_beams=3))[0].text
    penalised = library(repetition_penalty=3.0)
    assert penalised != library()
    assert chat(client, hello, extra_body={"repetition_penalty": 3.0}) == penalised
    sampled = chat(client, hello, temperature=1.0, seed=3, extra_body={"top_k": 2})
    assert sampled == library(temperature=1.0, top_k=2, seed=3)


BAD_DECODING = {
    "beams streamed": ({"stream": True, "extra_body": {"num_beams": 2}}, "stream"),
    "beams with n": ({"n": 2, "extra_body": {"num_beams": 2}}, "n"),
    "no beam width": ({"extra_body": {"use_beam_search": True}}, "best_of"),
    "two beam widths": ({"extra_body": {"use_beam_search": True, "best_of": 2, "num_beams": 3}}, "num_beams"),
    "best_of alone": ({"extra_body": {"best_of": 3}}, "best_of"),
    "num_beams zero": ({"extra_body": {"num_beams": 0}}, "num_beams"),
    "repetition_penalty zero": ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
}


@pytest.mark.parametrize("options, param", BAD_DECODING.values(), ids=BAD_DECODING.keys())
def test_bad_decoding_fields_get_400_naming_them(client, options, param):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, **options)
    assert info.value.status_code == 400 and info.value.param == param
    assert param in info.value.message


def still_serving(client) -> None:
    assert chat(client, max_tokens=2) is not None


BAD_REQUESTS = {
    "temperature": ({"temperature": -0.5}, "temperature"),
    "top_p zero": ({"top_p": 0}, "top_p"),
    "top_p above one": ({"top_p": 1.5}, "top_p"),
    "n": ({"n": 0}, "n"),
    "max_tokens": ({"max_tokens": 0}, "max_tokens"),
    "role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    "unknown field": ({"extra_body": {"beam_width": 4}}, "beam_width"),
    "penalty": ({"presence_penalty": 1.0}, "presence_penalty"),
    "logprobs": ({"logprobs": True}, "logprobs"),
    "n over the batch": ({"n": 17}, "n"),
}


@pytest.mark.parametrize("options, param", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_a_bad_parameter_gets_400_naming_it(client, options, param):
    options = {"model": MODEL, "messages": HI, **options}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**options)
    assert info.value.status_code == 400
    assert info.value.param == param and info.value.type == "invalid_request_error"
    assert param.split(".")[0] in info.value.message
    still_serving(client)


def test_harmless_fields_are_accepted(client):
    answer = client.chat.completions.create(
        model=MODEL, messages=HI, temperature=0, max_tokens=4, user="u1", presence_penalty=0, logprobs=False
    )
    assert answer.choices[0].message.content == chat(client, max_tokens=4)


def test_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    assert "gpt-4o" in info.value.message and MODEL in info.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="x")
    still_serving(client)


def test_a_prompt_over_the_context_gets_400_with_the_numbers(server, client):
    prompt_tokens = len(server[0].encode(HI))
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1020)
    assert info.value.code == "context_length_exceeded"
    assert all(str(n) in info.value.message for n in (1024, prompt_tokens, 1020, prompt_tokens + 1020))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * 1100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    still_serving(client)


def test_malformed_json_gets_400(server, client):
    request = urllib.request.Request(
        f"{server[1]}/v1/chat/completions", data=b'{"model": ', headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request)
    assert info.value.code == 400
    error = json.load(info.value)["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    still_serving(client)


def test_an_unexpected_failure_gets_500_in_one_line(server, client, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("the model fell over\nsecond line")

    monkeypatch.setattr(server[0], "generate", fail)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert info.value.status_code == 500
    assert info.value.body["message"] == "RuntimeError: the model fell over"
    monkeypatch.undo()
    still_serving(client)


def test_cli_announces_the_address_and_serves(tmp_path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cli = subprocess.Popen(
        [sys.executable, "-m", "llmtune", "serve", MODEL, "--port", str(port), "--max-batch-size", "4"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout.readline().strip() == f"serving {MODEL} on http://127.0.0.1:{port}/v1 (OpenAI-compatible)"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=HI, n=5)
        assert info.value.param == "n"
        assert [m.id for m in client.models.list()] == [MODEL]
    finally:
        cli.terminate()
        cli.wait(timeout=60)


@pytest.mark.parametrize(
    "args, fragment", [(["{tmp}/no-such-run"], "no-such-run"), ([MODEL, "--max-batch-size", "0"], "--max-batch-size")]
)
def test_cli_refuses_bad_input_in_one_line(tmp_path, args, fragment):
    # In process: main() prints an LLMTuneError as one line with its exit code; CliRunner hands the error back.
    result = CliRunner().invoke(app, ["serve", *(a.format(tmp=tmp_path) for a in args)])
    assert isinstance(result.exception, LLMTuneError) and result.exception.exit_code == 2
    assert "\n" not in str(result.exception) and fragment in str(result.exception)


def test_cli_refuses_a_taken_port_before_loading_the_model():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "no-such-model-is-loaded", "--port", str(port)])
    assert isinstance(result.exception, LLMTuneError) and f"127.0.0.1:{port}" in str(result.exception)
    assert "--port" in str(result.exception)
