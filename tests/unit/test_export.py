"""GGUF export (llmtune.export) and its Ollama Modelfile (llmtune.ollama) on the in-process tiny models.

The Modelfile's Go templates are checked with a small renderer for the subset of Go's text/template they use
(text, `{{ .Field }}`, `{{ $var }}`, `{{ $v := x }}` / `{{ $v = x }}`, range over .Messages, if / else if /
else with eq, ne, and, not), compared with the Jinja template's output.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import assert_one_line_error, expect_error, run_cli

from llmtune.export import GREEDY_QUANTS, QUANTS, TOLERANCES, adds_bos, export_gguf
from llmtune.models import load_tokenizer
from llmtune.ollama import GO_TEMPLATES, PROBE_CONVERSATIONS, go_template, match_registry, modelfile
from llmtune.templates import TEMPLATES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- a renderer for the Go-template subset the Modelfiles use ----------------------------------------


def _parse(template: str) -> list:
    """Nodes: ("text", s), ("print", expr), ("set", name, expr), ("range", expr, body), ("if", [(cond, body)], else)."""
    tokens = re.split(r"(\{\{.*?\}\})", template, flags=re.S)
    pos = 0

    def block(stop: tuple[str, ...]) -> tuple[list, str | None]:
        nonlocal pos
        nodes: list = []
        while pos < len(tokens):
            token = tokens[pos]
            pos += 1
            if not token.startswith("{{"):
                if token:
                    nodes.append(("text", token))
                continue
            action = token[2:-2].strip()
            word = action.split(" ", 1)[0]
            if word in stop or action.startswith("else"):
                return nodes, action
            if word == "range":
                body, _ = block(("end",))
                nodes.append(("range", action[len("range ") :], body))
            elif word == "if":
                branches, otherwise, cond = [], [], action[len("if ") :]
                while True:
                    body, ended = block(("end",))
                    branches.append((cond, body))
                    if ended.startswith("else if "):
                        cond = ended[len("else if ") :]
                        continue
                    if ended == "else":
                        otherwise, _ = block(("end",))
                    break
                nodes.append(("if", branches, otherwise))
            elif (m := re.fullmatch(r"(\$\w+)\s*:?=\s*(.+)", action)) is not None:
                nodes.append(("set", m.group(1), m.group(2)))
            else:
                nodes.append(("print", action))
        return nodes, None

    nodes, _ = block(())
    return nodes


def _value(expr: str, dot, root: dict, scope: dict):
    expr = expr.strip()
    if expr.startswith("(") and expr.endswith(")"):
        expr = expr[1:-1]
    parts = _group(expr)
    if len(parts) > 1:
        name, args = parts[0], [_value(a, dot, root, scope) for a in parts[1:]]
        if name == "eq":
            return args[0] == args[1]
        if name == "ne":
            return args[0] != args[1]
        if name == "and":
            return all(args) and args[-1]
        if name == "not":
            return not args[0]
        raise AssertionError(f"function {name} is outside the subset")
    if expr.startswith('"'):
        return expr[1:-1]
    if expr in ("true", "false"):
        return expr == "true"
    if expr.startswith("$"):
        return scope[expr]
    if expr.startswith("."):
        return (dot if isinstance(dot, dict) and expr[1:] in dot else root)[expr[1:]]
    raise AssertionError(f"expression {expr!r} is outside the subset")


def _group(expr: str) -> list[str]:
    """Split on spaces outside parentheses and quotes: `and $first (eq .Role "user")`."""
    out, depth, quoted, word = [], 0, False, ""
    for ch in expr:
        if ch == '"':
            quoted = not quoted
        if ch == " " and depth == 0 and not quoted:
            if word:
                out.append(word)
            word = ""
            continue
        depth += (ch == "(") - (ch == ")") if not quoted else 0
        word += ch
    return [*out, word] if word else out


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    root = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    scope: dict = {}

    def run(nodes: list, dot) -> str:
        out = ""
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out += node[1]
            elif kind == "print":
                out += str(_value(node[1], dot, root, scope))
            elif kind == "set":
                scope[node[1]] = _value(node[2], dot, root, scope)
            elif kind == "range":
                for item in _value(node[1], dot, root, scope):
                    out += run(node[2], item)
            else:
                for cond, body in node[1]:
                    if _value(cond, dot, root, scope):
                        out += run(body, dot)
                        break
                else:
                    out += run(node[2], dot)
        return out

    return run(_parse(template), root)


def ollama_render(template: str, system: str | None, conversation: list[dict[str, str]]) -> str:
    """What Ollama renders: the Modelfile's SYSTEM goes first when the conversation has no system message."""
    if system and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": system}, *conversation]
    return render_go(template, conversation)


def jinja(tok, template: str, conversation: list[dict[str, str]]) -> str:
    return tok.apply_chat_template(conversation, chat_template=template, tokenize=False, add_generation_prompt=True)


# --- Modelfile templates ---------------------------------------------------------------------------


def test_every_registry_template_has_a_go_translation():
    assert set(GO_TEMPLATES) == set(TEMPLATES)


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("with_bos", [True, False], ids=["llama.cpp adds BOS", "template writes BOS"])
def test_go_template_renders_each_conversation_as_the_jinja_template(name: str, with_bos: bool):
    tok = load_tokenizer("tiny:llama")
    go = go_template(name, tok, with_bos)
    for conversation in PROBE_CONVERSATIONS:
        want = jinja(tok, TEMPLATES[name].jinja, conversation)
        got = render_go(go, conversation)
        if with_bos and want.startswith(tok.bos_token):
            got = tok.bos_token + got  # llama.cpp puts it there
        assert got == want, (name, conversation)


def test_a_default_system_prompt_becomes_the_modelfiles_system_line():
    # SmolLM2-Instruct's own template: chatml, with a system message of its own when the conversation has none.
    tok = load_tokenizer("tiny:llama")
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    tok.chat_template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + default + "<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    assert match_registry(tok) == ("chatml", default)
    text = modelfile("model.gguf", tok, None)
    assert f'SYSTEM """{default}"""' in text
    go = go_template("chatml", tok, adds_bos(tok))
    for conversation in PROBE_CONVERSATIONS:
        assert ollama_render(go, default, conversation) == jinja(tok, tok.chat_template, conversation)


def test_modelfile_names_the_file_the_template_the_stop_tokens_and_the_system_prompt():
    tok = load_tokenizer("tiny:llama")
    tok.chat_template = TEMPLATES["chatml"].jinja
    lines = modelfile("model-q8_0.gguf", tok, "Answer in one word.").splitlines()
    assert lines[0] == "FROM ./model-q8_0.gguf"
    assert lines[1].startswith('TEMPLATE """{{ range .Messages }}<|im_start|>')
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert lines[-1] == 'SYSTEM """Answer in one word."""'


def test_a_template_like_no_registry_template_is_refused_for_ollama():
    tok = load_tokenizer("tiny:llama")
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with expect_error("--ollama", "renders like none of the registry templates", "chatml"):
        modelfile("model.gguf", tok, None)


# --- export -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant", QUANTS)
def test_each_quantization_writes_a_file_that_reads_back_within_its_tolerance(tmp_path: Path, quant: str):
    out = tmp_path / f"tiny-{quant}.gguf"
    lines: list[str] = []
    result = export_gguf("tiny:llama", out, quant, progress=lines.append)
    assert out.is_file() and result.size_bytes == out.stat().st_size
    assert [line.split(":")[0] for line in lines] == ["merge", "write", "verify"]
    assert f"max |logit diff| {result.max_abs_diff:.3g}" in lines[-1]
    assert result.max_abs_diff <= TOLERANCES[quant]
    if quant == "f32":
        assert result.max_abs_diff == 0.0
    else:
        assert result.max_abs_diff > 0.0  # the weights were really rounded
    if quant in GREEDY_QUANTS:
        assert result.greedy_equal
    assert result.f16_fallback == []
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


def family_checkpoint(directory: Path, model_type: str) -> Path:
    """tiny:llama's shape in another family, random, with the tiny byte tokenizer, saved as a checkpoint directory. Its
    embeddings have rows to spare, as real checkpoints pad theirs: loaded as Qwen2's, the tokenizer gains
    <|endoftext|>, and the rest become llama.cpp's [PAD] tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmtune.models import load_model

    tok, llama = load_tokenizer("tiny:llama"), load_model("tiny:llama").config
    shape = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    same = {key: getattr(llama, key) for key in (*shape, "max_position_embeddings", "bos_token_id", "eos_token_id")}
    # transformers' GGUF reader takes Qwen3's head width from its config default (128), not from the file.
    extra = {"head_dim": 128} if model_type == "qwen3" else {}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok) + 8, pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **same, **extra
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_other_families_export_exactly_in_f32_and_within_tolerance_in_q8_0(tmp_path: Path, model_type: str):
    checkpoint = family_checkpoint(tmp_path / model_type, model_type)
    exact = export_gguf(str(checkpoint), tmp_path / "f32.gguf", "f32", progress=lambda line: None)
    assert exact.max_abs_diff == 0.0 and exact.greedy_equal
    rounded = export_gguf(str(checkpoint), tmp_path / "q8_0.gguf", "q8_0", progress=lambda line: None)
    assert 0.0 < rounded.max_abs_diff <= TOLERANCES["q8_0"]


def test_smaller_quantizations_write_smaller_files(tmp_path: Path):
    sizes = {q: export_gguf("tiny:llama", tmp_path / f"{q}.gguf", q).size_bytes for q in ("f32", "f16", "q8_0", "q4_0")}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


def test_k_quants_are_refused_with_the_supported_list(tmp_path: Path):
    with expect_error("--quant q4_k_m", "llama-quantize", "supported: f32, f16, bf16, q8_0"):
        export_gguf("tiny:llama", tmp_path / "m.gguf", "q4_k_m")
    with expect_error("--quant q3", "unknown quantization", "q4_0"):
        export_gguf("tiny:llama", tmp_path / "m.gguf", "q3")
    assert not any(tmp_path.iterdir())


def test_an_unsupported_family_is_refused_with_the_supported_list(tmp_path: Path):
    with expect_error("model type 'gpt2'", "supported: llama, mistral, qwen2, qwen3"):
        export_gguf("tiny:gpt2", tmp_path / "m.gguf", "f16")
    assert not any(tmp_path.iterdir())


def test_an_encoder_decoder_is_refused(tmp_path: Path):
    with expect_error("model 'tiny:t5' is an encoder-decoder", "causal language models"):
        export_gguf("tiny:t5", tmp_path / "m.gguf", "f16")
    assert not any(tmp_path.iterdir())


def test_an_existing_output_is_refused_unless_overwrite(tmp_path: Path):
    out = tmp_path / "m.gguf"
    out.write_text("keep me")
    with expect_error(str(out), "already exists", "--overwrite"):
        export_gguf("tiny:llama", out, "f16")
    assert out.read_text() == "keep me"
    export_gguf("tiny:llama", out, "f16", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_a_failed_verification_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with expect_error("export check failed", "q8_0 logits differ", "nothing written"):
        export_gguf("tiny:llama", tmp_path / "m.gguf", "q8_0", tolerance=1e-9)
    assert not any(tmp_path.iterdir())

    import llmtune.generation

    real = llmtune.generation.generate
    calls = []

    def diverging(model, *args, **kwargs):  # the exported model (second call) completes differently
        calls.append(model)
        completions = real(model, *args, **kwargs)
        if len(calls) == 2:
            completions[0].text += " and more"
        return completions

    monkeypatch.setattr(llmtune.generation, "generate", diverging)
    with expect_error("export check failed", "f16 greedy completion of probe 0 differs", "nothing written"):
        export_gguf("tiny:llama", tmp_path / "m.gguf", "f16")
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_bad_quantization_in_one_line(tmp_path: Path):
    result = run_cli("export", "tiny:llama", "--quant", "q6_k", "--out", str(tmp_path / "m.gguf"), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "--quant q6_k", "supported: f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0")


def test_cli_refuses_other_formats(tmp_path: Path):
    result = run_cli("export", "tiny:llama", "--format", "onnx", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "--format onnx", "supported: gguf")
