"""Completions as generate, serve and chat return them: stop texts, finish reasons, token counts, prompts."""

from __future__ import annotations

import pytest
import torch
from helpers import expect_error

from llmtune.errors import LLMTuneError
from llmtune.generation import Generator, Sampling, generate
from llmtune.models import load_model, load_tokenizer
from llmtune.templates import stop_token_ids


def _tiny():
    torch.manual_seed(0)
    return load_model("tiny:llama"), load_tokenizer("tiny:llama")


def test_length_finish_counts_every_generated_token():
    model, tok = _tiny()
    prompt = tok("hello there")["input_ids"]
    [c] = generate(model, tok, [prompt], Sampling(max_new_tokens=5), batch_size=1)
    # An untrained model rarely emits EOS in 5 tokens; when it does, the count stops there.
    assert c.finish_reason in {"length", "stop"}
    assert (c.tokens == 5) == (c.finish_reason == "length")


def test_stop_text_ends_the_completion_before_it():
    model, tok = _tiny()
    prompt = tok("hello there")["input_ids"]
    [free] = generate(model, tok, [prompt], Sampling(max_new_tokens=12), batch_size=1)
    stop = free.text[3:5]
    assert stop.strip(), free.text  # the untrained model says something to cut
    [cut] = generate(model, tok, [prompt], Sampling(max_new_tokens=12, stop=(stop,)), batch_size=1)
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)].strip()
    assert stop not in cut.text


def test_stop_token_is_counted_and_ends_the_row_in_a_batch():
    model, tok = _tiny()
    eos = stop_token_ids(tok)[0]
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[eos] = 1e4  # every next token is EOS
    prompts = [tok("a")["input_ids"], tok("a much longer prompt here")["input_ids"]]
    for c in generate(model, tok, prompts, Sampling(max_new_tokens=6), batch_size=2):
        assert (c.text, c.tokens, c.finish_reason) == ("", 1, "stop")


def test_seeded_sampling_repeats_and_differs_from_another_seed():
    model, tok = _tiny()
    prompt = [tok("hello")["input_ids"]]
    texts = [
        generate(model, tok, prompt, Sampling(max_new_tokens=16, temperature=1.5, seed=seed), batch_size=1)[0].text
        for seed in (1, 1, 2)
    ]
    assert texts[0] == texts[1] != texts[2]


def test_generator_puts_the_system_prompt_first_unless_the_conversation_has_one():
    model, tok = _tiny()
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    gen = Generator(model, tok, "tiny", chat=True, system_prompt="Be brief.")
    user = [{"role": "user", "content": "hi"}]
    assert tok.decode(gen.encode(user)).endswith("<system>Be brief.<user>hi<assistant>")
    own = [{"role": "system", "content": "Be long."}, *user]
    assert "Be brief." not in tok.decode(gen.encode(own))
    plain = Generator(model, tok, "tiny", chat=False)
    assert tok.decode(plain.encode(user)).endswith("hi")
    assert gen.context_length == model.config.max_position_embeddings


def _hf_text(model, tok, prompt: list[int], **options) -> str:
    """transformers' own generate on one prompt, decoded as a completion: up to the first stop token."""
    stop = stop_token_ids(tok)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, eos_token_id=stop, pad_token_id=tok.pad_token_id, **options
        )[0, len(prompt) :].tolist()
    end = next((i for i, t in enumerate(out) if t in stop), len(out))
    return tok.decode(out[:end], skip_special_tokens=True).strip()


def test_beam_search_is_transformers_beam_search_and_differs_from_greedy():
    model, tok = _tiny()
    prompts = [tok(text)["input_ids"] for text in ("hello there", "a b c d", "the")]
    beams = [c.text for c in generate(model, tok, prompts, Sampling(max_new_tokens=10, num_beams=4), batch_size=3)]
    assert beams == [_hf_text(model, tok, p, num_beams=4, do_sample=False) for p in prompts]
    greedy = [c.text for c in generate(model, tok, prompts, Sampling(max_new_tokens=10), batch_size=3)]
    assert beams != greedy  # the search found other answers, so the comparison above is not greedy against greedy


def test_repetition_penalty_is_transformers_penalty_and_changes_greedy_output():
    model, tok = _tiny()
    prompt = tok("ab ab ab ab")["input_ids"]
    [penalised] = generate(model, tok, [prompt], Sampling(max_new_tokens=10, repetition_penalty=5.0), batch_size=1)
    assert penalised.text == _hf_text(model, tok, prompt, repetition_penalty=5.0, do_sample=False)
    [plain] = generate(model, tok, [prompt], Sampling(max_new_tokens=10), batch_size=1)
    assert penalised.text != plain.text
    [again] = generate(model, tok, [prompt], Sampling(max_new_tokens=10, repetition_penalty=5.0), batch_size=1)
    assert again.text == penalised.text


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"num_beams": 0}, "num_beams 0"),
        ({"num_beams": 2.5}, "num_beams 2.5"),
        ({"repetition_penalty": 0.0}, "repetition_penalty 0.0"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty nan"),
    ],
)
def test_bad_decoding_settings_are_refused_in_one_line(options, fragment):
    with expect_error(fragment):
        Sampling(**options)


def test_beam_search_cannot_stream():
    from transformers.generation.streamers import BaseStreamer

    model, tok = _tiny()
    with expect_error("num_beams 2", "cannot stream"):
        generate(model, tok, [tok("hi")["input_ids"]], Sampling(num_beams=2), batch_size=1, streamer=BaseStreamer())


def test_generate_cli_takes_beams_and_a_repetition_penalty():
    from typer.testing import CliRunner

    from llmtune.cli.app import app
    from llmtune.generation import complete

    options = ["--max-new-tokens", "8", "--num-beams", "3", "--repetition-penalty", "2.0"]
    result = CliRunner().invoke(app, ["generate", "tiny:llama", "hello there", *options])
    assert result.exit_code == 0, result.output
    expected = complete("tiny:llama", "hello there", Sampling(max_new_tokens=8, num_beams=3, repetition_penalty=2.0))
    assert result.stdout.strip() == expected
    assert expected != complete("tiny:llama", "hello there", Sampling(max_new_tokens=8))
    refused = CliRunner().invoke(app, ["generate", "tiny:llama", "hi", "--repetition-penalty", "0"])
    assert isinstance(refused.exception, LLMTuneError) and "repetition_penalty 0.0" in str(refused.exception)
