"""An Ollama Modelfile for an exported GGUF: the chat template in Ollama's Go-template syntax, stop tokens, system.

Ollama does not run Jinja, so each registry template (llmtune.templates.TEMPLATES) has a hand-written Go
translation here, and a tokenizer's own template is translated only when it renders exactly like one of them
(on a set of conversations), possibly with a default system prompt, which becomes the Modelfile's SYSTEM:
Ollama puts SYSTEM first when a conversation has no system message, as such templates do. The translations are
checked against the Jinja templates by tests/unit/test_export.py, which renders both.

Two differences from Jinja are by design: Ollama's templates have no `trim`, so message contents are written as
given; and llama.cpp adds BOS itself when the GGUF says so, so a template's leading BOS is left out then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmtune.errors import LLMTuneError
from llmtune.templates import TEMPLATES, stop_tokens, template_names

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The system message of the conversation, for templates that put it inside the first user turn, and `$first`,
# true until the first non-system message has been written.
_SYSTEM = (
    '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
    "{{ $first := true }}"
)
_EACH = '{{ range .Messages }}{{ if ne .Role "system" }}'
_NEXT = "{{ $first = false }}{{ end }}{{ end }}"
_DEFAULT_PREAMBLE = {
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n",
    "vicuna": "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. ",
}

# Go templates per registry template; {bos} / {eos} become the tokenizer's tokens, {first_bos} is BOS unless
# llama.cpp adds it. Each renders .Messages ending in a user turn plus the generation prompt.
GO_TEMPLATES = {
    "chatml": "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n",
    "llama3": "{first_bos}{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
    "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama2": _SYSTEM + _EACH + '{{ if eq .Role "user" }}{{ if $first }}{first_bos}{{ else }}{bos}'
    "{{ end }}[INST] {{ if and $first $system }}<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ end }}"
    "{{ .Content }} [/INST]{{ else }} {{ .Content }} {eos}{{ end }}" + _NEXT,
    "mistral": "{first_bos}" + _SYSTEM + _EACH + '{{ if eq .Role "user" }}[INST] {{ if and $first $system }}'
    "{{ $system }}\n\n{{ end }}{{ .Content }} [/INST]{{ else }}{{ .Content }}{eos}{{ end }}" + _NEXT,
    "gemma": "{first_bos}" + _SYSTEM + _EACH + '<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}'
    "{{ .Role }}{{ end }}\n{{ if and $first $system }}{{ $system }}\n\n{{ end }}"
    "{{ .Content }}<end_of_turn>\n" + _NEXT + "<start_of_turn>model\n",
    "phi3": "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
    "zephyr": "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{eos}\n{{ end }}<|assistant|>\n",
    "alpaca": _SYSTEM
    + "{{ if $system }}{{ $system }}\n\n{{ else }}"
    + _DEFAULT_PREAMBLE["alpaca"]
    + "{{ end }}"
    + _EACH
    + '{{ if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n{{ else }}'
    "{{ .Content }}{eos}\n\n{{ end }}" + _NEXT,
    "vicuna": _SYSTEM
    + "{{ if $system }}{{ $system }} {{ else }}"
    + _DEFAULT_PREAMBLE["vicuna"]
    + "{{ end }}"
    + _EACH
    + '{{ if eq .Role "user" }}USER: {{ .Content }} {{ else }}ASSISTANT: {{ .Content }}{eos}'
    "{{ end }}" + _NEXT + "ASSISTANT:",
}
# Conversations a tokenizer's own template must render exactly like a registry template's to share its Go form.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Thanks"},
    ],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
    ],
]
_MARKER = "\x00system\x00"


def go_template(name: str, tokenizer: PreTrainedTokenizerBase, adds_bos: bool) -> str:
    """The Go form of registry template `name` for this tokenizer's BOS/EOS tokens."""
    bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    text = GO_TEMPLATES[name].replace("{first_bos}", "" if adds_bos else bos)
    return text.replace("{bos}", bos).replace("{eos}", eos)


def match_registry(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str | None] | None:
    """The registry template the tokenizer's chat template renders like, and the default system prompt it adds to
    conversations without one (None if it adds none); None when it renders like none of them."""
    from jinja2.exceptions import TemplateError

    own = tokenizer.chat_template
    for name, template in TEMPLATES.items():
        try:
            if all(_render(tokenizer, own, c) == _render(tokenizer, template.jinja, c) for c in PROBE_CONVERSATIONS):
                return name, None
            default = _default_system(tokenizer, own, template.jinja)
        except TemplateError:
            continue
        if default is not None:
            return name, default
    return None


def _default_system(tokenizer: PreTrainedTokenizerBase, own: str, registry: str) -> str | None:
    """The system prompt `own` adds when a conversation has none, if it is otherwise `registry`."""
    with_system = [c for c in PROBE_CONVERSATIONS if c[0]["role"] == "system"]
    if not all(_render(tokenizer, own, c) == _render(tokenizer, registry, c) for c in with_system):
        return None
    found = None
    for conversation in (c for c in PROBE_CONVERSATIONS if c[0]["role"] != "system"):
        pattern = _render(tokenizer, registry, [{"role": "system", "content": _MARKER}, *conversation])
        before, _, after = pattern.partition(_MARKER)
        text = _render(tokenizer, own, conversation)
        if not (text.startswith(before) and text.endswith(after)) or len(text) < len(before) + len(after):
            return None
        system = text[len(before) : len(text) - len(after)]
        if found not in (None, system):
            return None
        found = system
    return found


def _render(tokenizer: PreTrainedTokenizerBase, template: str, conversation: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(
        conversation, chat_template=template, tokenize=False, add_generation_prompt=True
    )


def modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None) -> str:
    """The Modelfile text for `gguf_name` (a file next to it); raises when the chat template has no Go form."""
    from llmtune.export import adds_bos

    if not tokenizer.chat_template:
        raise LLMTuneError(
            "--ollama: the model has no chat template to translate into the Modelfile; export without --ollama, "
            f"or train with data.chat_template set to one of {template_names()}"
        )
    matched = match_registry(tokenizer)
    if matched is None:
        raise LLMTuneError(
            "--ollama: the chat template renders like none of the registry templates, and only those have an "
            f"Ollama translation ({template_names()}); export without --ollama and write the Modelfile's TEMPLATE "
            "by hand, or train with data.chat_template set to one of them"
        )
    name, default_system = matched
    template = go_template(name, tokenizer, adds_bos(tokenizer))
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{_quoted(template, "TEMPLATE")}"""']
    for token in stop_tokens(tokenizer):
        if '"' in token:
            raise LLMTuneError(f"--ollama: stop token {token!r} contains a quote, which a Modelfile cannot hold")
        lines.append(f'PARAMETER stop "{token}"')
    system = system_prompt or default_system
    if system:
        lines.append(f'SYSTEM """{_quoted(system, "SYSTEM")}"""')
    return "\n".join(lines) + "\n"


def _quoted(text: str, what: str) -> str:
    if '"""' in text or text.endswith('"'):
        raise LLMTuneError(f"--ollama: the {what} contains quotes a Modelfile cannot hold: {text[:40]!r}")
    return text
