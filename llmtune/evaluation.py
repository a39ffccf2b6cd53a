"""Run a model over held-out data, by scoring (perplexity) and by generation (BLEU, ROUGE, exact match)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtune import artifacts, metrics
from llmtune.artifacts import RunDir, is_run_dir
from llmtune.data import IGNORE_INDEX, Sample, encode_dataset, encode_prompt, split_samples
from llmtune.errors import LLMTuneError
from llmtune.models import checkpoint_kind, load_base_model, load_model, load_teacher, load_tokenizer, load_tuned
from llmtune.recipe import DistillSpec, Recipe, load_recipe
from llmtune.report import write_run_report

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GENERATION_METRICS = ("bleu", "rouge", "exact_match")


@dataclass
class EvalReport:
    results: dict[str, dict[str, float]]  # {"tuned": {...}, "base": {...}}
    predictions: list[dict[str, Any]]
    out: Path | None
    examples: int


def evaluate(
    target: str | Path,
    compare_base: bool = False,
    out: Path | None = None,
    overrides: list[str] | None = None,
) -> EvalReport:
    """Evaluate a run directory (tuned, and base with `compare_base`) or a recipe's base model."""
    path = Path(target)
    if is_run_dir(path):
        artifacts.open_run(path)
        recipe = load_recipe(path / artifacts.RECIPE_FILE, overrides)
        model, tokenizer = load_tuned(path)
        label = "tuned"
        out = out or path / artifacts.EVAL_FILE
    else:
        if path.is_dir():
            artifacts.open_run(path)  # says why this directory is not a run
        recipe = load_recipe(path, overrides)
        tokenizer = load_tokenizer(recipe.tokenizer or recipe.model)
        model = load_base_model(recipe, quantized=False)
        label, compare_base = "base", False
    _, samples = split_samples(recipe)
    if not samples:
        raise LLMTuneError(f"{path}: no held-out data; set data.eval or data.eval_split above 0")
    samples = samples[: recipe.eval.max_examples or len(samples)]

    teacher = _teacher_of(recipe)
    if teacher is not None and label == "tuned":
        compare_base = True  # a distilled student is always shown beside its untrained self and its teacher

    results, generations = {}, {}
    results[label], generations[label] = score_model(model, tokenizer, samples, recipe, teacher)
    if compare_base:
        with _base_of(model, recipe) as base:
            results["base"], generations["base"] = score_model(base, tokenizer, samples, recipe, teacher)
    if teacher is not None:
        results["teacher"], generations["teacher"] = score_model(teacher, tokenizer, samples, recipe)

    predictions = _prediction_rows(samples, tokenizer, generations, is_encoder_decoder(model))
    if out is not None:
        artifacts.write_json(out, results)
        if predictions:
            artifacts.write_jsonl(_predictions_path(out, path), predictions)
    if label == "tuned" and out == path / artifacts.EVAL_FILE:
        write_run_report(RunDir(path))
    return EvalReport(results=results, predictions=predictions, out=out, examples=len(samples))


def _teacher_of(recipe: Recipe) -> PreTrainedModel | None:
    if not isinstance(recipe.objective, DistillSpec):
        return None
    return load_teacher(recipe.objective.teacher, recipe.training.dtype)


@contextlib.contextmanager
def _base_of(model: PreTrainedModel, recipe: Recipe):
    if hasattr(model, "disable_adapter"):
        # The base is the same weights with the adapter switched off: no second copy in memory.
        with model.disable_adapter():
            yield model
    else:
        yield load_base_model(recipe, quantized=False)


def _predictions_path(out: Path, target: Path) -> Path:
    if out == target / artifacts.EVAL_FILE:
        return target / artifacts.PREDICTIONS_FILE
    return out.with_name(out.stem + "_predictions.jsonl")


def _prediction_rows(
    samples: list[Sample],
    tokenizer: PreTrainedTokenizerBase,
    generations: dict[str, list[str] | None],
    encoder_decoder: bool,
) -> list[dict[str, Any]]:
    if any(g is None for g in generations.values()):
        return []
    rows = []
    for i, sample in enumerate(samples):
        prompt, reference = sample.prompt_and_reference()
        rows.append(
            {
                "prompt": tokenizer.decode(encode_prompt(prompt, tokenizer, encoder_decoder)),
                "reference": reference,
                "prediction": {name: gens[i] for name, gens in generations.items()},
            }
        )
    return rows


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    recipe: Recipe,
    teacher: PreTrainedModel | None = None,
) -> tuple[dict[str, float], list[str] | None]:
    """The recipe's metrics for one model, and its generations (None when no generation metric applies).

    Args:
        teacher: for distillation, also report the mean KL(teacher || model) per response token (kl_to_teacher).
    """
    wanted = recipe.eval.metrics
    model.eval()
    results: dict[str, float] = {}
    if "perplexity" in wanted or teacher is not None:
        dataset, _ = encode_dataset(samples, tokenizer, recipe.data, recipe.objective.loss_on, "eval data")
    if "perplexity" in wanted:
        nll, n = response_nll(model, tokenizer, dataset["input_ids"], dataset["labels"], recipe.eval.batch_size)
        results["perplexity"] = metrics.perplexity(nll, n)
        results["loss"] = nll / n
    if teacher is not None:
        results["kl_to_teacher"] = teacher_kl(
            model, teacher, tokenizer, dataset["input_ids"], dataset["labels"], recipe.eval.batch_size
        )
    pairs = [s.prompt_and_reference() for s in samples]
    if not any(m in wanted for m in GENERATION_METRICS) or any(p is None for p in pairs):
        return results, None
    prompts = [encode_prompt(p, tokenizer, is_encoder_decoder(model)) for p, _ in pairs]
    references = [r for _, r in pairs]
    predictions = generate_texts(model, tokenizer, prompts, recipe.eval.max_new_tokens, recipe.eval.batch_size)
    if "bleu" in wanted:
        results["bleu"] = metrics.bleu(predictions, references)
    if "rouge" in wanted:
        results.update(metrics.rouge(predictions, references))
    if "exact_match" in wanted:
        results["exact_match"] = metrics.exact_match(predictions, references)
    return results, predictions


@torch.no_grad()
def response_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[list[int]],
    labels: list[list[int]],
    batch_size: int,
) -> tuple[float, int]:
    """Summed negative log-likelihood of every label that is not -100, and how many there are."""
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        ids, attn = pad_batch(input_ids[start : start + batch_size], tokenizer.pad_token_id, left=False)
        lab, _ = pad_batch(labels[start : start + batch_size], IGNORE_INDEX, left=False)
        if is_encoder_decoder(model):
            # The decoder reads the labels shifted right behind its start token; logit t predicts label t.
            logits = model(input_ids=ids, attention_mask=attn, labels=lab).logits.float()
            targets = lab
        else:
            # Prompt tuning returns logits for its virtual tokens too; they come first.
            logits = model(input_ids=ids, attention_mask=attn).logits[:, -ids.size(1) :][:, :-1].float()
            targets = lab[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += nll.item()
        count += int((targets != IGNORE_INDEX).sum())
    if count == 0 or not math.isfinite(total):
        raise LLMTuneError(f"evaluation: negative log-likelihood is {total} over {count} tokens")
    return total, count


@torch.no_grad()
def teacher_kl(
    model: PreTrainedModel,
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[list[int]],
    labels: list[list[int]],
    batch_size: int,
) -> float:
    """Mean forward KL(teacher || model) at temperature 1 over the tokens that carry loss (nats per token)."""
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        ids, attn = pad_batch(input_ids[start : start + batch_size], tokenizer.pad_token_id, left=False)
        lab, _ = pad_batch(labels[start : start + batch_size], IGNORE_INDEX, left=False)
        student = model(input_ids=ids, attention_mask=attn).logits[:, -ids.size(1) :, :].float().log_softmax(-1)
        reference = teacher(input_ids=ids, attention_mask=attn).logits.float().log_softmax(-1)
        per_token = (reference.exp() * (reference - student)).sum(-1)[:, :-1]
        mask = lab[:, 1:] != IGNORE_INDEX
        total += per_token[mask].sum().item()
        count += int(mask.sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> list[str]:
    """Complete each prompt, left-padded in batches, stopping at EOS; greedy unless temperature > 0."""
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
    model.eval()
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids, attn = pad_batch(prompts[start : start + batch_size], tokenizer.pad_token_id, left=True)
        out = model.generate(
            input_ids=ids,
            attention_mask=attn,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        # A decoder-only model returns prompt + completion; an encoder-decoder returns the decoder's output only.
        for row in out if is_encoder_decoder(model) else out[:, ids.size(1) :]:
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def pad_batch(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        attn[i, span] = 1
    return ids, attn


def complete(
    target: str,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    raw: bool = False,
) -> str:
    """Answer one prompt with a run directory's tuned model or any model reference, formatted as in training."""
    path = Path(target)
    system_prompt = None
    if is_run_dir(path):
        model, tokenizer = load_tuned(path)
        data = load_recipe(path / artifacts.RECIPE_FILE).data
        use_template = data.chat_template and data.format != "text"
        system_prompt = data.system_prompt
    else:
        tokenizer = load_tokenizer(target)
        kind = checkpoint_kind(target)
        model = load_model(target, kind=kind)
        # An encoder-decoder reads plain source text, as objective seq2seq trained it.
        use_template = bool(tokenizer.chat_template) and kind == "causal-lm"
    if raw or not use_template:
        sample = Sample(segments=[(prompt, False)])
    else:
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        sample = Sample(messages=[*system, {"role": "user", "content": prompt}])
    torch.manual_seed(seed)
    prompt_ids = encode_prompt(sample, tokenizer, is_encoder_decoder(model))
    [text] = generate_texts(model, tokenizer, [prompt_ids], max_new_tokens, 1, temperature, top_k, top_p)
    return text
