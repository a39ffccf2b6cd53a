"""The chat-template registry, and what a template means for training: its tokens and its end of turn.

`data.chat_template` picks the template: `true` (the tokenizer's own), `false` (plain text), a registry name,
a Jinja string or a `.jinja` file. `apply_template` puts it on the tokenizer, which the run directory saves,
so every later command renders exactly what training saw. Tokens a template writes that the tokenizer lacks
(`<|im_start|>` on a Llama base) are added as special tokens; their embedding rows are new and train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmtune.errors import LLMTuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    tokens: tuple[str, ...]  # written as single special tokens; added when the tokenizer lacks them
    used_by: str  # model families trained with it, for the docs
    note: str = ""  # where it departs from the family's own template, and why


# Roles must alternate user/assistant after an optional system message in the templates that say so, as the
# families' own templates require; the others render any order.
_ALTERNATE = (
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}{% endif %}"
)
# Templates without a system role put it in front of the first user message, as Gemma's own template does.
_SPLIT_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
)

TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            "chatml",
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
            ("<|im_start|>", "<|im_end|>"),
            "Qwen 1.5-3, SmolLM, Hermes, Yi, many fine-tunes",
        ),
        ChatTemplate(
            "llama3",
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
            " + '<|eot_id|>' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
            ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
            "Llama 3, 3.1, 3.2, 3.3",
        ),
        ChatTemplate(
            "llama2",
            _SPLIT_SYSTEM + "{% for message in loop_messages %}" + _ALTERNATE + "{% if message['role'] == 'user' %}"
            "{% if loop.first and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
            "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
            "{{ bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
            "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}",
            (),
            "Llama 2 chat, CodeLlama instruct",
        ),
        ChatTemplate(
            "mistral",
            "{{ bos_token }}" + _SPLIT_SYSTEM + "{% for message in loop_messages %}" + _ALTERNATE + ""
            "{% if message['role'] == 'user' %}{% set content = message['content'] %}"
            "{% if loop.first and system %}{% set content = system + '\\n\\n' + content %}{% endif %}"
            "{{ '[INST] ' + content + ' [/INST]' }}"
            "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
            (),
            "Mistral 7B Instruct, Mixtral Instruct",
            "a system message opens the first user turn; Mistral's v0.3 template puts it in the last one, which "
            "rewrites earlier turns as a conversation grows, so no turn could be trained in place",
        ),
        ChatTemplate(
            "gemma",
            "{{ bos_token }}" + _SPLIT_SYSTEM + "{% for message in loop_messages %}" + _ALTERNATE + ""
            "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
            "{{ '<start_of_turn>' + role + '\\n' + (system + '\\n\\n' if loop.first and system else '') }}"
            "{{ message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}",
            ("<start_of_turn>", "<end_of_turn>"),
            "Gemma 1, 2, 3",
            "no system role: a system message opens the first user turn, as Gemma 3's template does",
        ),
        ChatTemplate(
            "phi3",
            "{% for message in messages %}"
            "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
            ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
            "Phi-3, Phi-3.5",
            "no EOS after the last turn: Phi-3's template writes one only there, so a conversation's text would "
            "change when it grows; turns end with <|end|>, the token Phi-3 stops at",
        ),
        ChatTemplate(
            "zephyr",
            "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + "
            "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
            (),
            "Zephyr, TinyLlama chat",
        ),
        ChatTemplate(
            "alpaca",
            "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
            "{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\\n\\n' }}{% set loop_messages = messages %}"
            "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
            "{{ '### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
            "{% else %}{{ message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}",
            (),
            "Stanford Alpaca and its instruction-tuned descendants",
        ),
        ChatTemplate(
            "vicuna",
            "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
            '{% set loop_messages = messages[1:] %}{% else %}{{ "A chat between a curious user and an artificial '
            "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
            'questions. " }}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}'
            "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
            "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
            (),
            "Vicuna v1.1+, FastChat models",
        ),
    )
}

# `data.chat_template: false` for conversations: the turns as written, each response ended by EOS.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)

# The special-token convention (`<|im_start|>`, `<|eot_id|>`): how a Jinja template given in the recipe marks
# the tokens it needs as single tokens.
_SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")


def template_names() -> str:
    return ", ".join(TEMPLATES)


def is_jinja(value: str) -> bool:
    return "{{" in value or "{%" in value


def check_choice(value: bool | str) -> None:
    """Raise ValueError unless `value` is a valid data.chat_template (a .jinja file is checked when read)."""
    if isinstance(value, bool) or value in TEMPLATES or is_jinja(value) or value.endswith(".jinja"):
        return
    raise ValueError(
        f"unknown chat template {value!r}; use one of {template_names()}, a Jinja string, a .jinja file, "
        "true (the tokenizer's own) or false (plain text)"
    )


def apply_template(tokenizer: PreTrainedTokenizerBase, choice: bool | str) -> list[str]:
    """Put the recipe's template on the tokenizer; returns the special tokens it added (their rows are new)."""
    if choice is True:
        if not tokenizer.chat_template:
            raise missing_template(tokenizer)
        return []
    if choice is False:
        tokenizer.chat_template = PLAIN_TEMPLATE
        return []
    if choice in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[choice].jinja
    else:
        tokenizer.chat_template = choice if is_jinja(choice) else _read_jinja(choice)
    vocab = tokenizer.get_vocab()
    missing = [t for t in template_tokens(tokenizer, choice) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def template_tokens(tokenizer: PreTrainedTokenizerBase, choice: bool | str) -> tuple[str, ...]:
    """The special tokens a recipe's template writes: the registry's list, or the `<|...|>` tokens of a Jinja
    template (read from the tokenizer, which holds it once applied); none for the tokenizer's own or plain text."""
    if isinstance(choice, bool):
        return ()
    if choice in TEMPLATES:
        return TEMPLATES[choice].tokens
    return tuple(dict.fromkeys(_SPECIAL_TOKEN.findall(tokenizer.chat_template or "")))


def missing_template(tokenizer: PreTrainedTokenizerBase) -> LLMTuneError:
    return LLMTuneError(
        f"tokenizer {tokenizer.name_or_path!r} has no chat template; set data.chat_template to one of "
        f"{template_names()} (or a Jinja string or .jinja file), or to false for the turns as plain text"
    )


def _read_jinja(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except OSError as e:
        raise LLMTuneError(f"{path}: data.chat_template file cannot be read ({e.strerror})") from None


def end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token that ends an assistant turn under the tokenizer's template: EOS when the template writes it
    in the turn, else the special token that directly follows the response (`<|im_end|>`, `<|eot_id|>`).
    With neither, EOS is what training appends, so the tuned model still learns to stop."""
    eos = tokenizer.eos_token
    marker = "\x00response\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "question"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # a template that needs more than one plain exchange: rendering the data will say why
        return eos
    after = text[text.find(marker) + len(marker) :] if marker in text else ""
    if eos and eos in after:
        return eos
    added = [t.content for t in tokenizer.added_tokens_decoder.values()]
    tokens = sorted({t for t in [*tokenizer.all_special_tokens, *added] if t}, key=len, reverse=True)
    return next((t for t in tokens if after.startswith(t)), eos)


def stop_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """EOS and, when the template ends turns with another token, that token: where generation stops."""
    tokens = [tokenizer.eos_token] if tokenizer.eos_token else []
    turn = end_of_turn(tokenizer) if tokenizer.chat_template else None
    return tokens + [turn] if turn and turn not in tokens else tokens


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of the stop tokens that are single tokens of the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in stop_tokens(tokenizer) if t in vocab]
