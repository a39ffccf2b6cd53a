"""Load a tuned run or any model ready to answer, and complete prompts: what generate, eval, serve and chat share."""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtune import artifacts
from llmtune.accel import on_device
from llmtune.artifacts import is_run_dir
from llmtune.batching import padded_batches
from llmtune.data import Sample, encode_prompt
from llmtune.errors import LLMTuneError
from llmtune.masking import sentinel_ids
from llmtune.models import checkpoint_kind, load_model, load_tokenizer, load_tuned
from llmtune.recipe import Recipe, load_recipe
from llmtune.templates import stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer


@dataclass(frozen=True)
class Sampling:
    """How each next token is picked and when a completion ends; greedy unless temperature > 0.

    With num_beams > 1 the completion is the best of a beam search; with temperature > 0 as well, each beam's next
    tokens are sampled instead of taken best-first (transformers' beam sampling), so beams may differ run to run.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()  # texts that end a completion; the completion stops before them
    seed: int | None = None  # reseeds torch before generating, so one request samples the same text each time
    num_beams: int = 1  # candidates a beam search keeps at each step; 1: no beam search
    # Divides the score of every token already in the prompt or the completion (multiplies it when negative), as
    # CTRL proposed; above 1 discourages repeats, below 1 encourages them; None: off.
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise LLMTuneError(f"num_beams {self.num_beams!r}: give a whole number of at least 1 (1: no beam search)")
        penalty = self.repetition_penalty
        if penalty is not None and not (isinstance(penalty, (int, float)) and math.isfinite(penalty) and penalty > 0):
            raise LLMTuneError(f"repetition_penalty {penalty!r}: give a number above 0 (1: no penalty)")

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"do_sample": False}
        if self.temperature > 0:
            kwargs = {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k or 0}
            kwargs["top_p"] = self.top_p or 1.0
        if self.num_beams > 1:
            kwargs["num_beams"] = self.num_beams
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = float(self.repetition_penalty)
        return kwargs


@dataclass
class Completion:
    text: str
    tokens: int  # tokens generated, the stop token included
    finish_reason: str  # "stop" (a stop token or stop text) or "length" (max_new_tokens reached)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int,
    streamer: BaseStreamer | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Completion]:
    """Complete each prompt, left-padded in batches, stopping at EOS, the template's end of turn or a stop text.

    Args:
        streamer: a transformers streamer; it receives each step's new tokens for the whole batch.
        progress: called with the number of prompts finished after each batch.
    """
    if streamer is not None and sampling.num_beams > 1:
        raise LLMTuneError(
            f"num_beams {sampling.num_beams}: beam search knows its answer only at the end, so it cannot stream"
        )
    model.eval()
    stop_ids = stop_token_ids(tokenizer)
    kwargs = sampling.generate_kwargs()
    if sampling.stop:
        kwargs.update(stop_strings=list(sampling.stop), tokenizer=tokenizer)
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    # T5's sentinels are special tokens, but in a span-corruption model's answer they say which gap a span fills.
    shown = set(sentinel_ids(tokenizer))
    completions = []
    for ids, attn, _ in padded_batches(prompts, batch_size, tokenizer.pad_token_id, model.device, left=True):
        generator, inputs = _generation_inputs(model, ids, attn)
        with torch.no_grad():
            out = generator.generate(
                **inputs,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                streamer=streamer,
                **kwargs,
            )
        # An encoder-decoder returns its decoder start token + the completion; a decoder-only model given input
        # ids returns them + the completion; given embeddings (prompt tuning), only the completion.
        given = 1 if is_encoder_decoder(model) else inputs["input_ids"].size(1) if "input_ids" in inputs else 0
        completions.extend(_completion(row.tolist(), tokenizer, stop_ids, sampling, shown) for row in out[:, given:])
        if progress is not None:
            progress(ids.size(0))
    return completions


def _completion(
    row: list[int], tokenizer: PreTrainedTokenizerBase, stop_ids: list[int], sampling: Sampling, shown: set[int]
) -> Completion:
    """Args:
    shown: special tokens the text keeps (the others are dropped from it)."""
    end = next((i for i, t in enumerate(row) if t in stop_ids), None)
    tokens = row if end is None else row[: end + 1]
    hidden = set(tokenizer.all_special_ids) - shown
    text = tokenizer.decode([t for t in tokens if t not in hidden], skip_special_tokens=not shown)
    cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
    if cut >= 0:
        return Completion(text=text[:cut].strip(), tokens=len(tokens), finish_reason="stop")
    finish = "stop" if end is not None or len(tokens) < sampling.max_new_tokens else "length"
    return Completion(text=text.strip(), tokens=len(tokens), finish_reason=finish)


def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    sampling: Sampling,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """The completions' texts of each prompt, as evaluation scores them."""
    return [c.text for c in generate(model, tokenizer, prompts, sampling, batch_size, progress=progress)]


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def prompt_learning_config(model: PreTrainedModel):
    """The peft config of prefix, prompt or p-tuning, or None for any other model."""
    config = getattr(model, "active_peft_config", None)
    return config if config is not None and config.is_prompt_learning else None


def _generation_inputs(model: PreTrainedModel, ids: torch.Tensor, attn: torch.Tensor) -> tuple[PreTrainedModel, dict]:
    """The model to call `generate` on, and its inputs.

    For prefix, prompt and p-tuning the virtual tokens go in here, and the base model generates: peft's own
    generation path places them wrongly under transformers 5 (prefix tuning loses its prefix at the first step;
    prompt tuning decodes every cached token at the wrong position). The attention mask covers the virtual tokens
    too, so generate numbers positions from it exactly as training did: virtual tokens first, then the prompt,
    left padding masked and skipped.
    """
    config = prompt_learning_config(model)
    if config is None:
        return model, {"input_ids": ids, "attention_mask": attn}
    virtual = torch.ones(ids.size(0), config.num_virtual_tokens, dtype=attn.dtype, device=attn.device)
    attention_mask = torch.cat([virtual, attn], dim=1)
    if config.peft_type == "PREFIX_TUNING":
        # The prefix is a pre-filled KV cache; generate skips the input ids it covers, so any id stands in for them.
        stand_ins = torch.full_like(virtual, ids[0, -1].item())
        # Transformers renamed `past_key_values` to `cache` during 5.x.
        key = "cache" if "cache" in inspect.signature(model.get_base_model().forward).parameters else "past_key_values"
        inputs = {"input_ids": torch.cat([stand_ins, ids], dim=1), key: model.get_prompt(batch_size=ids.size(0))}
    else:
        prompts = model.get_prompt(batch_size=ids.size(0))
        embeds = model.get_input_embeddings()(ids)
        inputs = {"inputs_embeds": torch.cat([prompts.to(embeds.dtype), embeds], dim=1)}
    return model.get_base_model(), {**inputs, "attention_mask": attention_mask}


@dataclass
class Generator:
    """A model ready to answer, with its tokenizer, and prompts formatted as its training formatted them."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what clients call it: the run directory's or the model reference's name
    chat: bool  # prompts go through the chat template (false: plain text, as a text or seq2seq run trained)
    system_prompt: str | None = None  # the recipe's data.system_prompt, put first when a conversation has none
    recipe: Recipe | None = None  # the run's recipe; None for a model reference

    @property
    def context_length(self) -> int | None:
        """Most tokens the model attends to (prompt + completion), less any virtual tokens; None when unknown."""
        length = getattr(self.model.config, "max_position_embeddings", None)
        if length is None:
            limit = self.tokenizer.model_max_length
            length = limit if limit < 1_000_000 else None
        config = prompt_learning_config(self.model)
        return length - config.num_virtual_tokens if length and config is not None else length

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ending in a user turn, with the generation prompt; without a chat template
        the turns' contents are joined as plain text."""
        if not self.chat:
            return encode_prompt(
                Sample(segments=[("".join(m["content"] for m in messages), False)]),
                self.tokenizer,
                is_encoder_decoder(self.model),
            )
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return encode_prompt(Sample(messages=messages), self.tokenizer)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a raw prompt, no template applied."""
        return encode_prompt(Sample(segments=[(text, False)]), self.tokenizer, is_encoder_decoder(self.model))

    def generate(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        batch_size: int | None = None,
        streamer: BaseStreamer | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Completion]:
        return generate(
            self.model, self.tokenizer, prompts, sampling, batch_size or len(prompts) or 1, streamer, progress
        )


# Runs whose model does not generate text, and what `llmtune generate` gives for those that answer otherwise.
_NOT_GENERATING = {
    "reward-model": "a reward model: it scores responses",
    "classify": "a classifier: it labels text",
    "token-classify": "a tagger: it labels each word",
    "mlm": "a masked language model: it predicts the tokens hidden behind its mask token",
}
_ANSWERS = {
    "classify": "TEXT` prints a label",
    "token-classify": "TEXT` prints each word with its tag",
    "mlm": "'TEXT with [MASK]'` prints its predictions for each mask",
}


def load_generator(target: str | Path, allow_classifier: bool = False) -> Generator:
    """A run directory's tuned model (adapter applied, no merge) or any model reference, ready to generate.

    Args:
        allow_classifier: accept a classification or token-classification run (whose `generate` is labels)
            or a masked LM run (its predictions for the mask tokens), for `llmtune generate`.
    """
    path = Path(target).expanduser()
    if is_run_dir(path):
        recipe = load_recipe(path / artifacts.RECIPE_FILE)
        kind = recipe.objective.name
        if kind == "reward-model" or (kind in _ANSWERS and not allow_classifier):
            raise LLMTuneError(
                f"{path} is {_NOT_GENERATING[kind]} and does not generate; `llmtune eval {path}` reports its scores"
                + (f" and `llmtune generate {path} {_ANSWERS[kind]}" if kind in _ANSWERS else "")
            )
        model, tokenizer = load_tuned(path)
        data = recipe.data
        chat = bool(tokenizer.chat_template) and data.format != "text" and recipe.objective.model_kind == "causal-lm"
        return Generator(on_device(model), tokenizer, path.resolve().name, chat, data.system_prompt, recipe)
    ref = str(target)
    tokenizer = load_tokenizer(ref)
    kind = checkpoint_kind(ref)
    model = on_device(load_model(ref, kind=kind))
    # An encoder-decoder reads plain source text, as objective seq2seq trained it.
    chat = bool(tokenizer.chat_template) and kind == "causal-lm"
    name = path.resolve().name if path.exists() else ref
    return Generator(model, tokenizer, name, chat)


def complete(target: str, prompt: str, sampling: Sampling | None = None, raw: bool = False) -> str:
    """Answer one prompt with a run directory's tuned model or any model reference, formatted as in training; a
    classification run gives its label and every label's probability, a token-classification run each word with
    its tag, a masked LM run its fill-mask predictions."""
    generator = load_generator(target, allow_classifier=True)
    recipe = generator.recipe
    if recipe is not None and recipe.objective.name == "classify":
        from llmtune.objectives.classify import classify_text

        return classify_text(generator.model, generator.tokenizer, prompt, recipe)
    if recipe is not None and recipe.objective.name == "mlm":
        from llmtune.objectives.denoising import fill_mask

        return fill_mask(generator.model, generator.tokenizer, prompt)
    if recipe is not None and recipe.objective.name == "token-classify":
        from llmtune.objectives.token_classify import tag_text

        return tag_text(generator.model, generator.tokenizer, prompt, recipe)
    ids = generator.encode_text(prompt) if raw else generator.encode([{"role": "user", "content": prompt}])
    [completion] = generator.generate([ids], sampling or Sampling())
    return completion.text


# --- a file of prompts: `llmtune generate TARGET --input prompts.jsonl --output out.jsonl` ---------------------

# What each output row adds to its input row. Not "completion": that is the reference column of prompt/completion
# data, which users run through generate to compare; evaluation's predictions file says "prediction" too.
OUTPUT_KEYS = ("prediction", "finish_reason", "tokens")


@dataclass
class FileReport:
    output: Path
    rows: int  # rows in the input file
    resumed: int  # rows already in the output when this run started
    written: int  # rows this run wrote


def generate_file(
    target: str,
    input_path: Path,
    output: Path,
    sampling: Sampling,
    batch_size: int = 8,
    raw: bool = False,
    overwrite: bool = False,
) -> FileReport:
    """Complete every row of a file of prompts into a JSONL file: each input row plus OUTPUT_KEYS, in input order.

    Each row is written whole and flushed as its batch finishes, so an interrupted run loses at most the batch in
    flight; a rerun checks that the rows already written belong to this input and continues after them.

    Args:
        raw: give `prompt` rows to the model as they are, without the chat template (`messages` rows always use it).
        overwrite: start the output over instead of continuing it.
    """
    from llmtune import progress

    rows = read_prompt_rows(input_path)
    if output.resolve() == input_path.resolve():
        raise LLMTuneError(f"{output}: --output is the input file; write the completions to another file")
    done, offset = (0, 0) if overwrite else _resume_point(output, input_path, rows)
    if done == len(rows):
        return FileReport(output, len(rows), done, 0)
    generator = load_generator(target)
    prompts = [_encode_row(generator, row, raw) for row in rows[done:]]
    _check_fits(generator, prompts, sampling, input_path, done)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("r+b" if offset else "wb") as f, progress.bar(len(rows), generator.name, initial=done) as advance:
        f.truncate(offset)  # drops a line cut off mid-write
        f.seek(offset)
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            for i, completion in enumerate(generator.generate(batch, sampling, batch_size), done + start):
                line = {**rows[i], "prediction": completion.text}
                line.update(finish_reason=completion.finish_reason, tokens=completion.tokens)
                # One whole line per write, flushed, so a killed run leaves whole rows (and at worst one cut-off
                # line, if the kernel cut the write, which the next run drops).
                f.write((json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8"))
                f.flush()
            advance(len(batch))
    return FileReport(output, len(rows), done, len(rows) - done)


def read_prompt_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL prompts file, each checked to hold one `prompt` string or one `messages` conversation
    that ends in a user turn."""
    from llmtune.data import load_rows

    if path.suffix.lower() != ".jsonl":
        raise LLMTuneError(f"{path}: --input must be a JSONL file, one {{'prompt': ...}} or {{'messages': ...}} a line")
    if not path.is_file():
        raise LLMTuneError(f"{path}: prompts file not found")
    rows = list(load_rows(str(path)))
    if not rows:
        raise LLMTuneError(f"{path}: no rows; each line needs a 'prompt' string or a 'messages' list")
    for number, row in enumerate(rows, 1):
        where = f"{path} row {number}"
        given = [key for key in ("prompt", "messages") if key in row]
        if len(given) != 1:
            raise LLMTuneError(f"{where}: needs exactly one of 'prompt' (a string) or 'messages' (a list); has {given}")
        if "prompt" in row and (not isinstance(row["prompt"], str) or not row["prompt"].strip()):
            raise LLMTuneError(f"{where}: 'prompt' must be a non-empty string")
        if "messages" in row and _conversation(row, where)[-1]["role"] != "user":
            raise LLMTuneError(f"{where}: 'messages' must end with a user message for the model to answer")
        taken = [key for key in OUTPUT_KEYS if key in row]
        if taken:
            raise LLMTuneError(f"{where}: has {taken[0]!r}, which generate writes; rename that column")
    return rows


def _conversation(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A row's messages as {role, content}, read as training data reads them (ShareGPT's from/value too)."""
    from llmtune.data import _messages

    return [{"role": m["role"], "content": m["content"]} for m in _messages(row["messages"], where, "messages", False)]


def _encode_row(generator: Generator, row: dict[str, Any], raw: bool) -> list[int]:
    if "messages" in row:
        return generator.encode(_conversation(row, "messages"))
    if raw:
        return generator.encode_text(row["prompt"])
    return generator.encode([{"role": "user", "content": row["prompt"]}])


def _check_fits(generator: Generator, prompts: list[list[int]], sampling: Sampling, source: Path, first: int) -> None:
    limit = generator.context_length
    for number, ids in enumerate(prompts, first + 1):
        if limit is not None and len(ids) + sampling.max_new_tokens > limit:
            raise LLMTuneError(
                f"{source} row {number}: the prompt is {len(ids)} tokens; with --max-new-tokens "
                f"{sampling.max_new_tokens} that exceeds {generator.name}'s context of {limit} tokens"
            )


def _resume_point(output: Path, source: Path, rows: list[dict[str, Any]]) -> tuple[int, int]:
    """How many rows the output already holds for this input, and the byte offset after them; a line cut off
    mid-write (no newline at its end) does not count."""
    if not output.is_file():
        return 0, 0
    data = output.read_bytes()
    offset = data.rfind(b"\n") + 1
    written = data[:offset].splitlines()
    if len(written) > len(rows):
        raise LLMTuneError(
            f"{output} has {len(written)} rows, more than the {len(rows)} of {source}: it belongs to another input; "
            "pass --overwrite to start over or choose another --output"
        )
    for number, line in enumerate(written, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or {k: v for k, v in row.items() if k not in OUTPUT_KEYS} != rows[number - 1]:
            raise LLMTuneError(
                f"{output} row {number} is not {source} row {number} with its prediction: the output belongs to "
                "another input; pass --overwrite to start over or choose another --output"
            )
    return len(written), offset
