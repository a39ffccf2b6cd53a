"""The one place that knows dataset formats: load rows, format them, tokenize them, mask the loss.

A row becomes a `Sample`: either a conversation rendered with the tokenizer's chat template, or raw
text pieces. Tokenizing a sample gives `input_ids` and `labels`, where every token outside the
response (assistant turns, completion) is -100 and the EOS that ends each response carries loss.
"""

from __future__ import annotations

import array
import csv
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.errors import LLMTuneError, first_line
from llmtune.recipe import DataSpec, Recipe, is_local_data_ref
from llmtune.recipe.data import DataSourceSpec
from llmtune.templates import apply_template, end_of_turn, missing_template, template_names

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# Canonical column names of each format; `data.columns` maps them to the names in the user's file.
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "instruction": ("instruction", "input", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected"),
    "classification": ("text", "label"),
    "token_classification": ("tokens", "tags"),
}
OPTIONAL_COLUMNS = {"input"}
# ShareGPT-style rows ({"from": "human", "value": ...}) are common enough to accept as they are.
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Sample:
    """One formatted row. Exactly one of `messages` and `segments` is set."""

    messages: list[dict[str, str]] | None = None
    segments: list[tuple[str, bool]] | None = None  # (text, carries loss); EOS is added after the last
    label: int | None = None  # format classification: index into objective.labels
    # format token_classification: the words, and each word's tag from objective.labels (segments then hold the
    # words joined by spaces, for whatever shows a row as text)
    words: list[str] | None = None
    tags: list[str] | None = None

    def prompt_and_reference(self) -> tuple[Sample, str] | None:
        """The part a model is given at inference, and the response it should produce (None for plain text)."""
        if self.messages is not None:
            last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
            return Sample(messages=self.messages[:last]), self.messages[last]["content"]
        loss_idx = [i for i, (_, loss) in enumerate(self.segments) if loss]
        if not loss_idx or loss_idx[-1] == 0:
            return None
        last = loss_idx[-1]
        return Sample(segments=self.segments[:last]), self.segments[last][0]


@dataclass
class PreferenceSample(Sample):
    """A prompt with a chosen and a rejected response. As a `Sample` it is the prompt with the chosen response,
    so generation metrics and merge probes treat the chosen response as the reference."""

    prompt: Sample | None = None
    rejected: Sample | None = None


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    eval_samples: list[Sample]
    report: dict[str, Any] = field(default_factory=dict)
    # sha256 of each source's rows as loaded, by its label: names the source that changed when a resume is refused.
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """sha256 of the token ids and labels trained and evaluated on: changes with data, template, tokenizer."""
        digest = hashlib.sha256()
        for dataset in (self.train, self.eval):
            # Sorted: ("input_ids", "labels") for SFT, as before preference columns existed.
            for column in sorted(dataset.column_names) if dataset is not None else []:
                for row in dataset[column]:
                    if isinstance(row, list) and all(isinstance(t, int) for t in row):
                        digest.update(array.array("q", row).tobytes())
                    else:  # prompts and references of objectives that generate
                        digest.update(json.dumps(row, sort_keys=True).encode())
        return digest.hexdigest()


@dataclass
class SourceSamples:
    """One source's share of the train or held-out split."""

    key: str  # data.train, or data.train[1] in a list
    label: str  # what errors and reports call it: its path, or `data.train[1] (PATH)` in a list
    path: str
    samples: list[Sample]
    fingerprint: str  # sha256 of every row the source holds, before any is held out or drawn


@dataclass
class Split:
    """The train or held-out samples, source by source, and the order that interleaves them."""

    parts: list[SourceSamples]
    order: list[int]  # the index of the part each sample comes from, in mixture order
    listed: bool  # the recipe gave a list of sources: reports count each one

    @property
    def samples(self) -> list[Sample]:
        return [self.parts[i].samples[j] for i, j in interleave(self.order, [len(p.samples) for p in self.parts])]


# --- loading ---------------------------------------------------------------------------------------


def load_rows(ref: str, split: str = "train") -> Sequence[dict[str, Any]]:
    """Rows of a local file, a `save_to_disk` directory or a hub dataset, as dicts."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return _load_from_disk(path, split)
    if path.is_file():
        loader = _FILE_LOADERS.get(path.suffix.lower())
        if loader is None:
            raise LLMTuneError(f"{path}: unsupported data file type; use one of {', '.join(_FILE_LOADERS)}")
        return loader(path)
    if is_local_data_ref(ref):
        raise LLMTuneError(f"{path}: data file not found")
    return _load_from_hub(ref, split)


def _load_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LLMTuneError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise LLMTuneError(f"{path}:{lineno}: each line must be a JSON object")
            rows.append(row)
    return rows


def _load_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise LLMTuneError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LLMTuneError(f"{path}: expected a JSON list of objects (or use .jsonl, one object per line)")
    return data


def _load_csv(path: Path) -> list[dict[str, Any]]:
    # utf-8-sig: spreadsheet programs start their "CSV UTF-8" files with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f))


def _load_parquet(path: Path) -> Sequence[dict[str, Any]]:
    from datasets import Dataset

    try:
        return Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
        raise LLMTuneError(f"{path}: cannot read parquet: {first_line(e)}") from None


def _load_txt(path: Path) -> list[dict[str, Any]]:
    # Blank lines separate documents, so a text file reads as one row per paragraph.
    text = path.read_text(encoding="utf-8-sig")
    return [{"text": block.strip()} for block in text.split("\n\n") if block.strip()]


_FILE_LOADERS = {
    ".jsonl": _load_jsonl,
    ".json": _load_json,
    ".csv": _load_csv,
    ".parquet": _load_parquet,
    ".txt": _load_txt,
}


def _load_from_disk(path: Path, split: str) -> Sequence[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise LLMTuneError(f"{path}: not a dataset saved with save_to_disk: {first_line(e)}") from None
    if isinstance(data, DatasetDict):
        if split not in data:
            raise LLMTuneError(f"{path}: no split {split!r}; set data.split to one of {', '.join(data)}")
        data = data[split]
    return data


def _load_from_hub(name: str, split: str) -> Sequence[dict[str, Any]]:
    import os

    from datasets import load_dataset

    from llmtune.models import hub_reachable

    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        raise LLMTuneError(
            f"dataset {name!r}: not a local file, and the Hugging Face Hub could not be reached to download it; "
            "point data.train at a local .jsonl/.json/.csv/.parquet file or a save_to_disk directory"
        )
    try:
        return load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError)
        raise LLMTuneError(f"dataset {name!r}: {first_line(e)}") from None


# --- formatting ------------------------------------------------------------------------------------


def check_columns(rows: Sequence[dict[str, Any]], spec: DataSpec, source: str, key: str = "data") -> None:
    """Raise unless the first row has the format's columns; `key` is where the recipe sets format and columns."""
    if len(rows) == 0:
        raise LLMTuneError(f"{source}: the dataset is empty")
    present = set(rows[0].keys())
    for canonical in FORMAT_COLUMNS[spec.format]:
        actual = spec.columns.get(canonical, canonical)
        if actual not in present and canonical not in OPTIONAL_COLUMNS:
            mapped = f" (mapped from {canonical!r})" if actual != canonical else ""
            raise LLMTuneError(
                f"{source}: column {actual!r}{mapped} not found for format {spec.format!r}; columns are "
                f"{', '.join(sorted(present))}; set {key}.format or map it with {key}.columns.{canonical}"
            )


def to_sample(row: dict[str, Any], spec: DataSpec, where: str, labels: list[str] | None = None) -> Sample:
    """Format one row; `where` names the file and row in errors; `labels` are the classes of format classification."""
    col = {c: spec.columns.get(c, c) for c in FORMAT_COLUMNS[spec.format]}
    if spec.format == "classification":
        text = _text(row.get(col["text"]), where, col["text"])
        return Sample(segments=[(text, False)], label=label_index(row.get(col["label"]), labels, where, col["label"]))
    if spec.format == "token_classification":
        return _tagged_sample(row.get(col["tokens"]), row.get(col["tags"]), labels, where, col)
    if spec.format == "text":
        text = _text(row.get(col["text"]), where, col["text"])
        return Sample(segments=[(text, True)])
    if spec.format == "preference":
        return _preference_sample(row, spec, where, col)
    if spec.format == "chat":
        messages = _messages(row.get(col["messages"]), where, col["messages"])
    elif spec.format == "instruction":
        instruction = _text(row.get(col["instruction"]), where, col["instruction"])
        extra = row.get(col["input"]) or ""
        prompt = f"{instruction}\n\n{extra}" if str(extra).strip() else instruction
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(row.get(col["output"]), where, col["output"])},
        ]
    else:
        messages = [
            {"role": "user", "content": _text(row.get(col["prompt"]), where, col["prompt"])},
            {"role": "assistant", "content": _text(row.get(col["completion"]), where, col["completion"])},
        ]
    if spec.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": spec.system_prompt}, *messages]
    if not spec.chat_template and spec.format != "chat":
        return Sample(segments=[(m["content"], m["role"] == "assistant") for m in messages])
    # Conversations without a template are rendered by the plain one (templates.PLAIN_TEMPLATE), turn by turn.
    return Sample(messages=messages)


def _text(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LLMTuneError(f"{where}: column {column!r} is empty or not text; every row needs a response")
    return value


def _tagged_sample(words: Any, tags: Any, labels: list[str], where: str, col: dict[str, str]) -> Sample:
    """A row of words, each with its tag (a name from `labels` or its index)."""
    if not isinstance(words, list) or not words:
        raise LLMTuneError(f"{where}: column {col['tokens']!r} must be a non-empty list of words")
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word.strip():
            raise LLMTuneError(
                f"{where}: {col['tokens']}[{i}] is {word!r}, not a word; every token must be non-empty text"
            )
    if not isinstance(tags, list):
        raise LLMTuneError(f"{where}: column {col['tags']!r} must be a list of tags, one per word")
    if len(tags) != len(words):
        raise LLMTuneError(f"{where}: {len(words)} tokens but {len(tags)} tags; give exactly one tag per word")
    names = [labels[label_index(tag, labels, where, f"{col['tags']}[{i}]")] for i, tag in enumerate(tags)]
    return Sample(segments=[(" ".join(words), False)], words=list(words), tags=names)


def _preference_sample(row: dict[str, Any], spec: DataSpec, where: str, col: dict[str, str]) -> PreferenceSample:
    """A prompt (text or messages) with chosen and rejected responses (text, or assistant messages)."""
    value = row.get(col["prompt"])
    if isinstance(value, list):
        prompt = _messages(value, where, col["prompt"], need_assistant=False)
    else:
        prompt = [{"role": "user", "content": _text(value, where, col["prompt"])}]
    responses = {}
    for key in ("chosen", "rejected"):
        value = row.get(col[key])
        if isinstance(value, list):
            responses[key] = _messages(value, where, col[key])
        elif isinstance(value, str) and value.strip():
            responses[key] = [{"role": "assistant", "content": value}]
        else:
            raise LLMTuneError(
                f"{where}: column {col[key]!r} is missing, empty or not text; every pair needs both responses"
            )
    if responses["chosen"] == responses["rejected"]:
        raise LLMTuneError(
            f"{where}: {col['chosen']!r} and {col['rejected']!r} are identical, so the row expresses no preference; "
            "fix or remove it"
        )
    if spec.system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": spec.system_prompt}, *prompt]
    if spec.chat_template:
        full = {key: Sample(messages=prompt + r) for key, r in responses.items()}
        return PreferenceSample(
            messages=full["chosen"].messages, prompt=Sample(messages=prompt), rejected=full["rejected"]
        )
    if any(len(m) > 1 for m in (prompt, *responses.values())):
        raise LLMTuneError(f"{where}: message lists need data.chat_template: true")
    prompt_text = prompt[0]["content"]
    full = {key: Sample(segments=[(prompt_text, False), (r[0]["content"], True)]) for key, r in responses.items()}
    return PreferenceSample(
        segments=full["chosen"].segments, prompt=Sample(segments=[(prompt_text, False)]), rejected=full["rejected"]
    )


def _messages(value: Any, where: str, column: str, need_assistant: bool = True) -> list[dict[str, Any]]:
    """{role, content} messages; an assistant message with `train: false` (or axolotl's `weight: 0`) keeps
    that key and carries no loss."""
    if not isinstance(value, list) or not value:
        raise LLMTuneError(f"{where}: column {column!r} must be a non-empty list of {{role, content}} messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise LLMTuneError(f"{where}: {column}[{i}] is not a {{role, content}} object")
        role = m.get("role", _SHAREGPT_ROLES.get(m.get("from", "")))
        content = m.get("content", m.get("value"))
        if role not in ("system", "user", "assistant", "tool") or not isinstance(content, str):
            raise LLMTuneError(f"{where}: {column}[{i}] needs a role (system/user/assistant) and text content")
        if role == "assistant" and not content.strip():
            raise LLMTuneError(f"{where}: {column}[{i}] is an empty assistant message")
        message = {"role": role, "content": content}
        if not _trained(m, role, f"{where}: {column}[{i}]"):
            message["train"] = False
        messages.append(message)
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise LLMTuneError(f"{where}: no assistant message, so no response tokens to train on")
    if need_assistant and all(m.get("train") is False for m in messages if m["role"] == "assistant"):
        raise LLMTuneError(f"{where}: every assistant message has train: false, so no response tokens to train on")
    return messages


def _trained(message: dict[str, Any], role: str, where: str) -> bool:
    train, weight = message.get("train"), message.get("weight")
    if train is None and weight is None:
        return True
    if role != "assistant":
        raise LLMTuneError(f"{where}: train / weight mark assistant messages only; remove it from this {role} message")
    if weight is not None:
        if weight not in (0, 1) or isinstance(weight, bool):
            raise LLMTuneError(f"{where}: weight must be 0 (no loss) or 1 (loss), got {weight!r}")
        if train is not None and bool(train) != bool(weight):
            raise LLMTuneError(f"{where}: train and weight disagree; keep one of them")
        return bool(weight)
    if not isinstance(train, bool):
        raise LLMTuneError(f"{where}: train must be true or false, got {train!r}")
    return train


def label_index(value: Any, labels: list[str], where: str, column: str) -> int:
    """A label given by name, or by index (an int, or digits as a CSV file holds it)."""
    if isinstance(value, str) and value in labels:
        return labels.index(value)
    index = value if isinstance(value, int) and not isinstance(value, bool) else None
    if isinstance(value, str) and value.strip().isdigit():
        index = int(value)
    if index is not None and 0 <= index < len(labels):
        return index
    raise LLMTuneError(
        f"{where}: {column} {value!r} is not one of objective.labels ({', '.join(labels)}) nor an index 0-"
        f"{len(labels) - 1}; fix the row or add the label to objective.labels"
    )


def load_samples(ref: str, spec: DataSpec, labels: list[str] | None = None) -> list[Sample]:
    return format_rows(load_rows(ref, spec.split), spec, ref, labels)


def format_rows(
    rows: Sequence[dict[str, Any]], spec: DataSpec, source: str, labels: list[str] | None = None, key: str = "data"
) -> list[Sample]:
    """Every row formatted as `spec` says; `source` names the data in errors, `key` where its format is set."""
    check_columns(rows, spec, source, key)
    return [to_sample(row, spec, f"{source}: row {i}", labels) for i, row in enumerate(rows, 1)]


def split_samples(recipe: Recipe) -> tuple[list[Sample], list[Sample]]:
    """Train and held-out samples, each in mixture order (see `load_splits`)."""
    train, held_out = load_splits(recipe)
    return train.samples, held_out.samples


def load_splits(recipe: Recipe) -> tuple[Split, Split]:
    """Train and held-out samples, source by source, every draw made by `training.seed`.

    Without data.eval, eval_split of each train source is held out first, so every source is evaluated and no
    held-out row is trained on; the sources' counts and weights then apply to the rows left for training.
    """
    spec = recipe.data
    rng = random.Random(recipe.training.seed)
    train, held_out = [], []
    for source, part in _load_sources(recipe, "train"):
        if spec.eval is None:
            part.samples, held = _hold_out(part.samples, spec.eval_split, rng)
            held_out.append(SourceSamples(part.key, part.label, part.path, held, part.fingerprint))
        train.append((source, part))
    listed = not isinstance(spec.train, str)
    train_split = _mix(train, spec.mix_stop, rng, listed)
    if spec.eval is None:
        return train_split, Split(held_out, _even_order(held_out), listed)
    return train_split, _mix(_load_sources(recipe, "eval"), spec.mix_stop, rng, not isinstance(spec.eval, str))


def _load_sources(recipe: Recipe, key: str) -> list[tuple[DataSourceSpec, SourceSamples]]:
    labels = getattr(recipe.objective, "labels", None)
    listed = not isinstance(getattr(recipe.data, key), str)
    found = []
    for name, label, source in recipe.data.sources(key):
        try:
            rows = load_rows(source.path, source.split)
        except LLMTuneError as e:
            if not listed:
                raise
            raise LLMTuneError(f"{name}: {e}") from None  # the message names the path already
        spec = recipe.data.model_copy(
            update={"format": source.format, "columns": source.columns, "split": source.split}
        )
        samples = format_rows(rows, spec, label, labels, name if listed else "data")
        digest = hashlib.sha256()
        for sample in samples:
            digest.update(json.dumps(asdict(sample), sort_keys=True).encode())
        found.append((source, SourceSamples(name, label, source.path, samples, digest.hexdigest())))
    return found


def _hold_out(samples: list[Sample], fraction: float, rng: random.Random) -> tuple[list[Sample], list[Sample]]:
    if fraction == 0 or len(samples) < 2:
        return samples, []
    order = list(range(len(samples)))
    rng.shuffle(order)
    held = set(order[: max(1, math.floor(len(samples) * fraction))])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def _mix(sources: list[tuple[DataSourceSpec, SourceSamples]], stop: str, rng: random.Random, listed: bool) -> Split:
    """Weighted sources interleaved at random until `stop`; otherwise every source's rows (or `count` of them),
    spread evenly through the split."""
    parts = [part for _, part in sources]
    if any(source.weight is not None for source, _ in sources):
        order = _interleave(parts, [source.weight for source, _ in sources], stop, rng)
        return Split(parts, order, listed)
    for source, part in sources:
        if source.count is not None:
            part.samples = _take(part, source.count, source.replace, rng)
    return Split(parts, _even_order(parts), listed)


def _take(part: SourceSamples, count: int, replace: bool, rng: random.Random) -> list[Sample]:
    """`count` rows drawn without repeats; with `replace`, whole passes over the rows first, so each row appears
    count // rows or one more times. Kept in the source's order."""
    n = len(part.samples)
    if count > n and not replace:
        raise LLMTuneError(
            f"{part.label}: count {count} is more than its {n} training rows (after eval_split is held out); "
            "lower count, or set replace: true to repeat rows"
        )
    picks = [i for _ in range(count // n) for i in range(n)] if replace else []
    picks += rng.sample(range(n), count - len(picks))
    return [part.samples[i] for i in sorted(picks)]


def _interleave(parts: list[SourceSamples], weights: list[float], stop: str, rng: random.Random) -> list[int]:
    """Draw a source by weight for each row and take its next row, every source in its own shuffled order.

    The mixture ends when a source has given all its rows (stop first_exhausted: no row repeats, and the mixture
    is about min(rows / share) long), or when every source has (all_exhausted: a source that runs out starts a
    new shuffled pass; about max(rows / share) long). Each part keeps the rows drawn from it, in drawn order.
    """
    pools = [p.samples for p in parts]
    queues = [rng.sample(range(len(pool)), len(pool)) for pool in pools]
    taken: list[list[Sample]] = [[] for _ in pools]
    finished = [False] * len(pools)
    order = []
    while True:
        i = rng.choices(range(len(pools)), weights)[0]
        if not queues[i]:
            queues[i] = rng.sample(range(len(pools[i])), len(pools[i]))
        taken[i].append(pools[i][queues[i].pop()])
        order.append(i)
        if not queues[i]:
            finished[i] = True
            if stop == "first_exhausted" or all(finished):
                break
    for part, rows in zip(parts, taken, strict=True):
        part.samples = rows
    return order


def _even_order(parts: list[SourceSamples]) -> list[int]:
    """Sources spread evenly: each row placed at its fraction of its source, so any prefix samples every source."""
    slots = [((j + 0.5) / len(p.samples), i) for i, p in enumerate(parts) for j in range(len(p.samples))]
    return [i for _, i in sorted(slots)]


def interleave(order: list[int], lengths: list[int]) -> list[tuple[int, int]]:
    """(part, row) pairs in mixture order, for parts that hold `lengths` rows once encoded.

    Encoding drops rows (and lm cuts a source into blocks), so a part may hold fewer rows than `order` gives it,
    or more: each follows `order` as far as its rows go, and rows left over come last.
    """
    taken = [0] * len(lengths)
    pairs = []
    for i in order:
        if taken[i] < lengths[i]:
            pairs.append((i, taken[i]))
            taken[i] += 1
    return pairs + [(i, j) for i, n in enumerate(lengths) for j in range(taken[i], n)]


def prepare_tokenizer(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give the tokenizer the recipe's chat template, or the tokens a denoising objective writes (BERT's mask
    token, T5's sentinels); returns the special tokens that had to be added."""
    from llmtune.masking import add_objective_tokens

    if added := add_objective_tokens(recipe.objective.name, tokenizer):
        return added
    if recipe.data.format in ("text", "classification") or recipe.objective.model_kind != "causal-lm":
        return []  # rows without turns, and encoders, read plain text
    return apply_template(tokenizer, recipe.data.chat_template)


# --- tokenizing and masking ------------------------------------------------------------------------


def encode(
    sample: Sample, tokenizer: PreTrainedTokenizerBase, loss_on: str = "response"
) -> tuple[list[int], list[int]]:
    """Token ids and labels for one sample; labels are -100 wherever no loss is taken.

    Args:
        loss_on: 'response' (every trained response), 'last_turn' (the last response only) or 'all'.
    """
    pieces = _pieces(sample, tokenizer, loss_on)
    ids, loss = _tokenize_pieces(tokenizer, pieces)
    if loss_on == "all":
        labels = list(ids)
    else:
        labels = [t if on else IGNORE_INDEX for t, on in zip(ids, loss, strict=True)]
    return ids, labels


def encode_prompt(sample: Sample, tokenizer: PreTrainedTokenizerBase, encoder_decoder: bool = False) -> list[int]:
    """Token ids of a prompt exactly as training saw them before the response (with the generation prompt).

    Args:
        encoder_decoder: the prompt is an encoder's whole input (the source, then EOS), as objective seq2seq trains.
    """
    if encoder_decoder:
        return _plain_ids(tokenizer, "".join(t for t, _ in sample.segments))
    if sample.messages is not None:
        text = _render(tokenizer, sample.messages, add_generation_prompt=True)
    else:
        text = "".join(t for t, _ in sample.segments)
    ids, _ = _tokenize_pieces(tokenizer, [(text, False)])
    return ids


def _pieces(sample: Sample, tokenizer: PreTrainedTokenizerBase, loss_on: str = "response") -> list[tuple[str, bool]]:
    eos = _eos_token(tokenizer)
    if sample.segments is not None:
        pieces = list(sample.segments)
        if loss_on == "last_turn":
            last = max((i for i, (_, loss) in enumerate(pieces) if loss), default=-1)
            pieces = [(text, loss and i == last) for i, (text, loss) in enumerate(pieces)]
        text, loss = pieces[-1]
        return [*pieces[:-1], (text + eos, loss)]
    # Render the conversation turn by turn, so the text between "prompt with generation prompt" and
    # "conversation through this assistant turn" is exactly the response the model must produce.
    turn_end = end_of_turn(tokenizer)
    answers = [i for i, m in enumerate(sample.messages) if m["role"] == "assistant"]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i in answers:
        m = sample.messages[i]
        trained = m.get("train", True) and (loss_on != "last_turn" or i == answers[-1])
        through = _render(tokenizer, sample.messages[: i + 1], add_generation_prompt=False)
        prefix = _render(tokenizer, sample.messages[:i], add_generation_prompt=True) if i else ""
        if i and prefix.startswith(done) and through.startswith(prefix):
            start = len(prefix)
        else:
            # An opening assistant turn has no "prompt so far" to render (and some templates add a system
            # prompt only then): locate the response by its text instead.
            start = through.find(m["content"], len(done))
            if start < 0 or not through.startswith(done):
                raise LLMTuneError(
                    f"tokenizer {tokenizer.name_or_path!r}: its chat template rewrites earlier turns, so responses "
                    f"cannot be located; set data.chat_template to a registry template ({template_names()}) or false"
                )
        response = through[start:]
        end = response.find(turn_end)
        pieces.append((through[len(done) : start], False))
        if end < 0:
            # The template does not end turns with a token: add EOS, or the tuned model never learns to stop.
            pieces.append((response.rstrip("\n") + eos, trained))
        else:
            pieces.append((response[: end + len(turn_end)], trained))
            pieces.append((response[end + len(turn_end) :], False))
        done = through
    tail = _render(tokenizer, sample.messages, add_generation_prompt=False)[len(done) :]
    if tail:
        pieces.append((tail, False))
    return [p for p in pieces if p[0]]


def _eos_token(tokenizer: PreTrainedTokenizerBase) -> str:
    if not tokenizer.eos_token:
        raise LLMTuneError(
            f"tokenizer {tokenizer.name_or_path!r} has no EOS token, so a tuned model could not learn to stop; "
            "use a tokenizer that defines eos_token"
        )
    return tokenizer.eos_token


def encode_seq2seq(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Encoder input (the source, then EOS) and labels (the target, then EOS) for an encoder-decoder.

    Every label carries loss: the decoder sees only the target, shifted right behind its start token.
    """
    prompt, target = sample.prompt_and_reference()
    return encode_prompt(prompt, tokenizer, encoder_decoder=True), _plain_ids(tokenizer, target)


def _plain_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # T5's tokenizer appends EOS itself, the in-process byte tokenizer prepends BOS: add EOS explicitly instead.
    _eos_token(tokenizer)
    return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    if not tokenizer.chat_template:
        raise missing_template(tokenizer)
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _tokenize_pieces(
    tokenizer: PreTrainedTokenizerBase, pieces: list[tuple[str, bool]]
) -> tuple[list[int], list[bool]]:
    """Tokenize the joined text once (as inference will) and mark tokens that start inside a loss piece."""
    text = "".join(t for t, _ in pieces)
    # Special tokens are never added here: a chat template that writes BOS plus a tokenizer that adds one
    # would give two. BOS is prepended below only when the text lacks it and the tokenizer expects it.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = list(enc["input_ids"])
    starts = [s for s, _ in enc["offset_mapping"]]
    bounds, pos = [], 0
    for piece, loss in pieces:
        bounds.append((pos, pos + len(piece), loss))
        pos += len(piece)
    loss_mask = [any(lo <= s < hi and loss for lo, hi, loss in bounds) for s in starts]
    bos = _bos_to_add(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids, loss_mask = [bos, *ids], [False, *loss_mask]
    return ids, loss_mask


def _bos_to_add(tokenizer: PreTrainedTokenizerBase) -> int | None:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if (
        tokenizer.bos_token_id is not None
        and len(with_special) > len(plain)
        and with_special[0] == tokenizer.bos_token_id
    ):
        return tokenizer.bos_token_id
    return None


def encode_dataset(
    samples: list[Sample], tokenizer: PreTrainedTokenizerBase, spec: DataSpec, loss_on: str, source: str
) -> tuple[Dataset, dict[str, int]]:
    """Tokenize, mask and length-limit samples; returns the dataset and counts of what was cut.

    Args:
        loss_on: 'response' or 'all' for one causal sequence per row; 'target' for an encoder-decoder's source
            (input_ids) and target (labels).
    """
    from datasets import Dataset

    input_ids, labels = [], []
    truncated = dropped = 0
    for i, sample in enumerate(samples, 1):
        ids, lab = encode_seq2seq(sample, tokenizer) if loss_on == "target" else encode(sample, tokenizer, loss_on)
        if not any(t != IGNORE_INDEX for t in lab):
            raise LLMTuneError(f"{source}: row {i} has no tokens that carry loss")
        # Causal rows: labels align with ids. Seq2seq rows: source and target are each limited to max_length.
        if max(len(ids), len(lab)) > spec.max_length:
            if spec.overflow == "drop":
                dropped += 1
                continue
            ids, lab = ids[: spec.max_length], lab[: spec.max_length]
            if all(t == IGNORE_INDEX for t in lab):
                # The whole response was cut away: the row would teach nothing.
                dropped += 1
                continue
            truncated += 1
        input_ids.append(ids)
        labels.append(lab)
    if not input_ids:
        raise LLMTuneError(
            f"{source}: every row is longer than data.max_length={spec.max_length} tokens; raise data.max_length"
        )
    counts = {
        "rows": len(input_ids),
        "truncated": truncated,
        "dropped": dropped,
        # A seq2seq row's tokens are its source and its target.
        "tokens": sum(len(x) for x in input_ids) + (sum(len(x) for x in labels) if loss_on == "target" else 0),
        "loss_tokens": sum(sum(t != IGNORE_INDEX for t in lab) for lab in labels),
    }
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels}), counts


def encode_preference(sample: PreferenceSample, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], ...]:
    """Prompt, chosen and rejected token ids; each response ends with its EOS, as in SFT."""
    prompt = encode_prompt(sample.prompt, tokenizer)
    chosen, rejected = (encode_through_response(response, tokenizer) for response in (sample, sample.rejected))
    # Tokens merged across the prompt/response boundary belong to the response, as TRL splits them.
    cut = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    return prompt[:cut], chosen[cut:], rejected[cut:]


def encode_through_response(sample: Sample, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a conversation up to and including the EOS that ends its last response."""
    ids, labels = encode(sample, tokenizer)
    return ids[: max(i for i, t in enumerate(labels) if t != IGNORE_INDEX) + 1]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_preference_dataset(
    samples: list[PreferenceSample], tokenizer: PreTrainedTokenizerBase, spec: DataSpec, source: str
) -> tuple[Dataset, dict[str, int]]:
    """Tokenize pairs into prompt_ids / chosen_ids / rejected_ids; a response over max_length is cut or dropped."""
    from datasets import Dataset

    columns: dict[str, list[list[int]]] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    truncated = dropped = 0
    for sample in samples:
        prompt, chosen, rejected = encode_preference(sample, tokenizer)
        room = spec.max_length - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            if spec.overflow == "drop" or room <= 0:
                dropped += 1
                continue
            chosen, rejected = chosen[:room], rejected[:room]
            truncated += 1
        for name, ids in zip(columns, (prompt, chosen, rejected), strict=True):
            columns[name].append(ids)
    if not columns["prompt_ids"]:
        raise LLMTuneError(
            f"{source}: every prompt is longer than data.max_length={spec.max_length} tokens; raise data.max_length"
        )
    loss_tokens = sum(len(c) + len(r) for c, r in zip(columns["chosen_ids"], columns["rejected_ids"], strict=True))
    counts = {
        "rows": len(columns["prompt_ids"]),
        "truncated": truncated,
        "dropped": dropped,
        "tokens": loss_tokens + 2 * sum(len(p) for p in columns["prompt_ids"]),
        "loss_tokens": loss_tokens,
    }
    return Dataset.from_dict(columns), counts


def prompt_value(prompt: Sample) -> list[dict[str, str]] | str:
    """A prompt as TRL's online trainers take it: its messages, or its plain text."""
    return prompt.messages if prompt.messages is not None else "".join(t for t, _ in prompt.segments)


def prompt_sample(prompt: list[dict[str, str]] | str) -> Sample:
    """A prompt_value as a Sample again."""
    return Sample(messages=prompt) if isinstance(prompt, list) else Sample(segments=[(prompt, False)])


def prompt_reference_dataset(
    samples: list[Sample], tokenizer: PreTrainedTokenizerBase, spec: DataSpec, source: str
) -> tuple[Dataset, dict[str, int]]:
    """Prompts (messages, rendered by TRL with the same chat template, or plain text) and their reference
    responses, for objectives that generate their own completions; prompts over max_length are dropped."""
    from datasets import Dataset

    prompts, references, tokens, dropped = [], [], 0, 0
    for sample in samples:
        prompt, reference = sample.prompt_and_reference()
        length = len(encode_prompt(prompt, tokenizer))
        if length >= spec.max_length:
            dropped += 1
            continue
        tokens += length
        prompts.append(prompt_value(prompt))
        references.append(reference)
    if not prompts:
        raise LLMTuneError(f"{source}: every prompt is longer than data.max_length={spec.max_length}; raise it")
    counts = {"rows": len(prompts), "truncated": 0, "dropped": dropped, "tokens": tokens}
    return Dataset.from_dict({"prompt": prompts, "reference": references}), counts


def encode_splits(
    recipe: Recipe, tokenizer: PreTrainedTokenizerBase, encode: Callable[..., tuple[Dataset, dict[str, Any]]], *args
) -> PreparedData:
    """The recipe's train and held-out samples, each source tokenized by `encode(samples, tokenizer, recipe.data,
    *args, source)` (encode_dataset, encode_preference_dataset, ...), with its counts for the data report."""
    train, held_out = load_splits(recipe)
    return prepare_splits(train, held_out, lambda samples, label: encode(samples, tokenizer, recipe.data, *args, label))


def prepare_splits(
    train: Split,
    held_out: Split,
    encode: Callable[[list[Sample], str], tuple[Dataset, dict[str, Any]]],
    encode_held_out: Callable[[list[Sample], str], tuple[Dataset, dict[str, Any]]] | None = None,
) -> PreparedData:
    """Both splits encoded source by source with `encode(samples, label)` (held-out rows with `encode_held_out`
    where they are encoded differently); without held-out rows there is no eval dataset."""
    report: dict[str, Any] = {}
    train_ds, report["train"] = encode_split(train, encode)
    eval_ds = None
    if held_out.samples:
        eval_ds, report["eval"] = encode_split(held_out, encode_held_out or encode)
    sources = {p.label: p.fingerprint for p in (*train.parts, *held_out.parts)}
    return PreparedData(train=train_ds, eval=eval_ds, eval_samples=held_out.samples, report=report, sources=sources)


def encode_split(
    split: Split, encode: Callable[[list[Sample], str], tuple[Dataset, dict[str, Any]]]
) -> tuple[Dataset, dict[str, Any]]:
    """Each source encoded on its own, so its errors and counts name it, then joined in mixture order."""
    from datasets import concatenate_datasets

    encoded = [encode(p.samples, p.label) if p.samples else (None, None) for p in split.parts]
    counts = split_counts(split, [c for _, c in encoded])
    datasets = [d for d, _ in encoded if d is not None]
    if len(datasets) == 1:
        return datasets[0], counts
    lengths = [len(d) if d is not None else 0 for d, _ in encoded]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    joined = concatenate_datasets(datasets)
    return joined.select([starts[i] + j for i, j in interleave(split.order, lengths)]), counts


def split_counts(split: Split, counts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The counts of a split's sources summed; for a list of sources, each source's counts under "sources" (a
    source that gave no rows, as a weighted mixture can leave one, counts zero)."""
    total = _sum_counts([c for c in counts if c is not None])
    if split.listed:
        total["sources"] = {
            p.key: {"path": p.path, **(c if c is not None else _zero_counts(total))}
            for p, c in zip(split.parts, counts, strict=True)
        }
    return total


def _sum_counts(counts: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for c in counts:
        for key, value in c.items():
            # A dict is classification's rows per label.
            total[key] = (
                _sum_counts([total.get(key, {}), value]) if isinstance(value, dict) else total.get(key, 0) + value
            )
    return total


def _zero_counts(counts: dict[str, Any]) -> dict[str, Any]:
    return {key: _zero_counts(value) if isinstance(value, dict) else 0 for key, value in counts.items()}


# --- language modelling: text packed into fixed-length blocks ---------------------------------------


def group_texts(rows: list[list[int]], eos_id: int, block: int, keep_remainder: bool) -> tuple[list[list[int]], int]:
    """Join token rows, each followed by EOS, into one stream and cut it into `block`-token blocks.

    Returns the blocks and how many tokens were dropped: the tail shorter than a block, unless
    `keep_remainder` makes it a last, shorter block (held-out text, so every token is scored).
    """
    stream = [t for ids in rows for t in (*ids, eos_id)]
    n_full = len(stream) // block
    blocks = [stream[i * block : (i + 1) * block] for i in range(n_full)]
    rest = stream[n_full * block :]
    if keep_remainder and rest:
        blocks.append(rest)
        rest = []
    return blocks, len(rest)


def lm_blocks(
    samples: list[Sample], tokenizer: PreTrainedTokenizerBase, block: int, keep_remainder: bool, source: str
) -> tuple[list[list[int]], dict[str, int]]:
    """Blocks of token ids for objective lm, and counts for the data report."""
    if tokenizer.eos_token_id is None:
        raise LLMTuneError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents with")
    # No special tokens per row: documents are separated by EOS only, as in the classic group-texts recipe.
    rows = [tokenizer("".join(t for t, _ in s.segments), add_special_tokens=False)["input_ids"] for s in samples]
    blocks, remainder = group_texts(rows, tokenizer.eos_token_id, block, keep_remainder)
    if not blocks:
        total = sum(len(r) + 1 for r in rows)
        raise LLMTuneError(
            f"{source}: the text is {total} tokens, less than one block of data.max_length={block}; "
            "lower data.max_length or add text"
        )
    tokens = sum(len(b) for b in blocks)
    counts = {"rows": len(blocks), "documents": len(rows), "truncated": 0, "dropped": 0, "tokens": tokens}
    return blocks, {**counts, "loss_tokens": tokens, "remainder_tokens": remainder}


# --- classification: one text and its label index per row ------------------------------------------


def encode_classification(
    samples: list[Sample], tokenizer: PreTrainedTokenizerBase, spec: DataSpec, labels: list[str], source: str
) -> tuple[Dataset, dict[str, Any]]:
    """Token ids with the tokenizer's own special tokens (an encoder pools its [CLS]), and label indices."""
    from datasets import Dataset

    input_ids, targets = [], []
    truncated = dropped = 0
    for sample in samples:
        ids = tokenizer(sample.segments[0][0], add_special_tokens=True)["input_ids"]
        if len(ids) > spec.max_length:
            if spec.overflow == "drop":
                dropped += 1
                continue
            truncated += 1
            # Keep a closing special token (BERT's [SEP]): the encoder was pretrained to see one.
            closing = ids[-1:] if ids[-1] in tokenizer.all_special_ids else []
            ids = ids[: spec.max_length - len(closing)] + closing
        input_ids.append(ids)
        targets.append(sample.label)
    counts = _labelled_counts(input_ids, targets, labels, spec, source, truncated=truncated, dropped=dropped)
    return Dataset.from_dict({"input_ids": input_ids, "labels": targets}), counts


def _labelled_counts(
    input_ids: list[list[int]], targets: list[int], labels: list[str], spec: DataSpec, source: str, **cut: int
) -> dict[str, Any]:
    """A classifier's counts for the data report: what was cut, and how often each label is trained on (`targets`:
    every label index); refuses a source whose every row was dropped."""
    if not input_ids:
        raise LLMTuneError(f"{source}: every row is longer than data.max_length={spec.max_length} tokens")
    return {
        "rows": len(input_ids),
        **cut,
        "tokens": sum(len(x) for x in input_ids),
        "labels": {name: targets.count(i) for i, name in enumerate(labels)},
    }


# --- token classification: words, and a tag per word ---------------------------------------------


def encode_token_classification(
    samples: list[Sample], tokenizer: PreTrainedTokenizerBase, spec: DataSpec, labels: list[str], source: str
) -> tuple[Dataset, dict[str, Any]]:
    """Token ids of the words (with the tokenizer's special tokens) and labels: each word's tag index on its first
    sub-token, -100 on its other sub-tokens and on special tokens, so every word counts once in loss and scores.

    A row over max_length loses its trailing words (a word whose first sub-token is cut goes untagged); the
    counts say how many (`cut_words`), or with data.overflow: drop the row goes.
    """
    from datasets import Dataset

    input_ids, targets = [], []
    truncated = dropped = cut_words = 0
    for i, sample in enumerate(samples, 1):
        ids, first = tokenize_words(tokenizer, sample.words, f"{source}: row {i}")
        if len(ids) > spec.max_length:
            if spec.overflow == "drop":
                dropped += 1
                continue
            truncated += 1
            ids, first = tokenize_words(tokenizer, sample.words, f"{source}: row {i}", spec.max_length)
            cut_words += len(sample.words) - len(first)
        row = [IGNORE_INDEX] * len(ids)
        for word, position in enumerate(first):
            row[position] = labels.index(sample.tags[word])
        input_ids.append(ids)
        targets.append(row)
    tagged = [t for row in targets for t in row if t != IGNORE_INDEX]
    cut = {"truncated": truncated, "dropped": dropped, "cut_words": cut_words}
    counts = _labelled_counts(input_ids, tagged, labels, spec, source, **cut)
    return Dataset.from_dict({"input_ids": input_ids, "labels": targets}), counts


def tokenize_words(
    tokenizer: PreTrainedTokenizerBase, words: list[str], where: str, max_length: int | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of pre-split words, and the position of each word's first sub-token (words cut by `max_length`
    have none, so the list is shorter than `words`)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LLMTuneError(
            f"tokenizer {tokenizer.name_or_path!r} is not a fast (Rust) tokenizer, so it cannot say which word each "
            "token comes from; objective token-classify needs one (a tokenizer.json)"
        )
    try:
        enc = tokenizer(words, is_split_into_words=True, truncation=max_length is not None, max_length=max_length)
    except (ValueError, AssertionError) as e:  # byte-level BPE tokenizers built without add_prefix_space refuse
        name = tokenizer.name_or_path
        raise LLMTuneError(f"tokenizer {name!r} cannot read pre-split words: {first_line(e)}") from None
    first: dict[int, int] = {}
    for position, word in enumerate(enc.word_ids()):
        if word is not None:
            first.setdefault(word, position)
    kept = len(first)
    if max_length is None and kept < len(words):
        missing = next(w for w in range(len(words)) if w not in first)
        raise LLMTuneError(
            f"{where}: word {missing} ({words[missing]!r}) gives no tokens with tokenizer {tokenizer.name_or_path!r}, "
            "so it cannot be tagged; remove or replace it"
        )
    return list(enc["input_ids"]), [first[w] for w in range(kept)]
