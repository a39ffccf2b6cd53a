"""The chat-template registry: each template's text, its loss tokens, its generation prompt, and its tokens."""

from __future__ import annotations

import pytest
from helpers import base_tokenizer, expect_error, write_jsonl

from llmtune.data import IGNORE_INDEX, Sample, encode, encode_prompt, prepare_tokenizer, to_sample
from llmtune.recipe import DataSpec, load_recipe
from llmtune.templates import TEMPLATES, apply_template, end_of_turn, stop_token_ids

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

# Each family's own format for CONVERSATION, written out from its published template (BOS <s>, EOS </s>).
OFFICIAL = {
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "4<|eot_id|>",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST] 2+2? [/INST]4</s>",
    "gemma": "<s><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
    "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
    "phi3": "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello!<|end|>\n<|user|>\n2+2?<|end|>\n"
    "<|assistant|>\n4<|end|>\n",
    "zephyr": "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n"
    "<|assistant|>\n4</s>\n",
    "alpaca": "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n### Instruction:\n2+2?\n\n"
    "### Response:\n4</s>\n\n",
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT: 4</s>",
}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}


def templated(name: str):
    tokenizer = base_tokenizer()
    apply_template(tokenizer, name)
    return tokenizer


def test_every_registry_template_is_checked():
    assert set(OFFICIAL) == set(TEMPLATES)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_renders_the_familys_own_text(name):
    tokenizer = templated(name)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == OFFICIAL[name]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_loss_is_on_each_answer_and_its_end_of_turn_only(name):
    tokenizer = templated(name)
    turn_end = END_OF_TURN.get(name, "</s>")
    assert end_of_turn(tokenizer) == turn_end
    ids, labels = encode(Sample(messages=CONVERSATION), tokenizer)
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    spans += [current] if current else []
    texts = [tokenizer.decode(span) for span in spans]
    assert [t.strip().removesuffix(turn_end).strip() for t in texts] == ["Hello!", "4"], texts
    assert all(t.rstrip().endswith(turn_end) for t in texts), texts
    # The end of turn is one token of the vocabulary, the last one trained in each span.
    assert all(span[-1] == tokenizer.convert_tokens_to_ids(turn_end) for span in spans)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_is_the_prefix_training_saw(name):
    tokenizer = templated(name)
    trained, _ = encode(Sample(messages=CONVERSATION), tokenizer)
    prompt = encode_prompt(Sample(messages=CONVERSATION[:-1]), tokenizer)
    assert trained[: len(prompt)] == prompt
    assert tokenizer.decode(trained[len(prompt) :]).strip().startswith("4")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_tokens_a_template_needs_are_added_once(name):
    tokenizer = base_tokenizer()
    size = len(tokenizer)
    added = apply_template(tokenizer, name)
    assert added == list(TEMPLATES[name].tokens)
    assert len(tokenizer) == size + len(added)
    for token in added:
        assert tokenizer.tokenize(f"x{token}y") == ["x", token, "y"]
    assert apply_template(tokenizer, name) == []  # a tokenizer that has them (a run's own) gains nothing


def test_a_template_that_ends_turns_with_its_own_token_stops_there_too():
    tokenizer = templated("llama3")
    vocab = tokenizer.get_vocab()
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id, vocab["<|eot_id|>"]]
    assert stop_token_ids(templated("mistral")) == [tokenizer.eos_token_id]


def test_a_jinja_string_adds_the_special_tokens_it_writes():
    tokenizer = base_tokenizer()
    jinja = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|stop|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    assert apply_template(tokenizer, jinja) == ["<|stop|>", "<|assistant|>"]
    assert end_of_turn(tokenizer) == "<|stop|>"
    ids, labels = encode(Sample(messages=CONVERSATION[1:3]), tokenizer)
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Hello!<|stop|>"


def test_the_tokenizers_own_template_is_kept_and_a_missing_one_is_named(tmp_path):
    tokenizer = base_tokenizer()
    with expect_error("has no chat template", "chatml, llama3, llama2", "Jinja string or .jinja file", "false"):
        apply_template(tokenizer, True)
    tokenizer.chat_template = TEMPLATES["zephyr"].jinja
    assert apply_template(tokenizer, True) == []
    assert tokenizer.chat_template == TEMPLATES["zephyr"].jinja


def recipe_with(tmp_path, chat_template, **data):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": CONVERSATION}])
    (tmp_path / "r.yaml").write_text(
        "model: tiny:llama\nmethod: {name: lora}\n"
        f"data: {{train: train.jsonl, chat_template: {chat_template!r}, "
        + "".join(f"{k}: {v!r}, " for k, v in data.items())
        + "}\n",
        encoding="utf-8",
    )
    return tmp_path / "r.yaml"


def test_a_jinja_file_is_read_relative_to_the_recipe(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "mine.jinja").write_text(TEMPLATES["vicuna"].jinja, encoding="utf-8")
    recipe = load_recipe(recipe_with(tmp_path, "t/mine.jinja"))
    tokenizer = base_tokenizer()
    prepare_tokenizer(recipe, tokenizer)
    assert tokenizer.chat_template == TEMPLATES["vicuna"].jinja
    with expect_error("missing.jinja", "data.chat_template file not found", "relative to the recipe file"):
        load_recipe(recipe_with(tmp_path, "missing.jinja"))


def test_an_unknown_template_name_is_refused_at_load_with_the_names(tmp_path):
    with expect_error("data.chat_template", "unknown chat template 'chatlm'", "chatml, llama3", "vicuna"):
        load_recipe(recipe_with(tmp_path, "chatlm"))


# --- chat data without a template, and where the loss goes ----------------------------------------


def test_chat_data_without_a_template_is_the_turns_as_plain_text():
    tokenizer = base_tokenizer()
    apply_template(tokenizer, False)
    sample = to_sample({"messages": CONVERSATION[1:]}, DataSpec(train="x.jsonl", chat_template=False), "f: row 1")
    ids, labels = encode(sample, tokenizer)
    assert tokenizer.decode(ids) == "<s>HiHello!</s>2+2?4</s>"
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Hello!</s>4</s>"
    prompt = encode_prompt(Sample(messages=CONVERSATION[1:-1]), tokenizer)
    assert ids[: len(prompt)] == prompt


def trained_text(messages, loss_on="response"):
    tokenizer = templated("chatml")
    sample = to_sample({"messages": messages}, DataSpec(train="x.jsonl"), "f: row 1")
    _, labels = encode(sample, tokenizer, loss_on)
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def test_loss_on_last_turn_trains_the_last_answer_only():
    assert trained_text(CONVERSATION) == "Hello!<|im_end|>4<|im_end|>"
    assert trained_text(CONVERSATION, "last_turn") == "4<|im_end|>"


@pytest.mark.parametrize("mark", [{"train": False}, {"weight": 0}])
def test_a_message_marked_not_to_train_carries_no_loss(mark):
    messages = [CONVERSATION[1], {**CONVERSATION[2], **mark}, *CONVERSATION[3:]]
    assert trained_text(messages) == "4<|im_end|>"


@pytest.mark.parametrize(
    ("index", "mark", "fragment"),
    [
        (1, {"weight": 0.5}, "weight must be 0 (no loss) or 1 (loss)"),
        (1, {"train": "no"}, "train must be true or false"),
        (1, {"train": True, "weight": 0}, "train and weight disagree"),
        (0, {"train": False}, "mark assistant messages only"),
    ],
)
def test_bad_message_marks_are_named(index, mark, fragment):
    messages = [dict(m) for m in CONVERSATION[1:3]]
    messages[index].update(mark)
    with expect_error(f"f: row 1: messages[{index}]", fragment):
        trained_text(messages)


def test_a_row_with_nothing_to_train_is_refused():
    with expect_error("f: row 1", "every assistant message has train: false"):
        trained_text([CONVERSATION[1], {**CONVERSATION[2], "train": False}])


def test_a_template_that_rewrites_earlier_turns_points_to_the_registry():
    # Mistral v0.3's own template puts the system message in the last user turn, so it moves as a chat grows.
    tokenizer = base_tokenizer()
    tokenizer.chat_template = (
        "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}{{ bos_token }}"
        "{% for m in messages[1:] %}{% if m['role'] == 'user' %}{{ '[INST] ' }}"
        "{% if m == users[-1] %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}{{ m['content'] + '[/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    with expect_error("rewrites earlier turns", "set data.chat_template to a registry template (chatml,", "mistral"):
        encode(Sample(messages=CONVERSATION), tokenizer)
    apply_template(tokenizer, "mistral")  # the advice works
    ids, labels = encode(Sample(messages=CONVERSATION), tokenizer)
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == "Hello!</s>4</s>"
