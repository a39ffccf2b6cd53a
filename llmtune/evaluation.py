"""Run a model over held-out data, by scoring (perplexity) and by generation (BLEU, ROUGE, exact match)."""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtune import artifacts, metrics
from llmtune.accel import on_device
from llmtune.artifacts import RunDir, is_run_dir
from llmtune.batching import padded_batches
from llmtune.data import IGNORE_INDEX, Sample, encode_dataset, encode_prompt, prepare_tokenizer, split_samples
from llmtune.errors import LLMTuneError
from llmtune.models import (
    checkpoint_kind,
    load_base_model,
    load_model,
    load_recipe_tokenizer,
    load_teacher,
    load_tokenizer,
    load_tuned,
    options_for,
)
from llmtune.recipe import DistillSpec, Recipe, load_recipe
from llmtune.report import write_run_report
from llmtune.templates import stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

GENERATION_METRICS = ("bleu", "rouge", "exact_match")


@dataclass
class EvalReport:
    results: dict[str, dict[str, float]]  # {"tuned": {...}, "base": {...}}
    predictions: list[dict[str, Any]]
    out: Path | None
    examples: int
    notes: list[str] = field(default_factory=list)  # what a reader must know to read the numbers


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
        # A new head (classification) is initialised from the torch seed: the same one training started from.
        torch.manual_seed(recipe.training.seed)
        model, tokenizer = load_tuned(path)
        model = on_device(model)
        label = "tuned"
        out = out or path / artifacts.EVAL_FILE
    else:
        if path.is_dir():
            artifacts.open_run(path)  # says why this directory is not a run
        recipe = load_recipe(path, overrides)
        tokenizer = load_recipe_tokenizer(recipe)
        prepare_tokenizer(recipe, tokenizer)
        torch.manual_seed(recipe.training.seed)
        model = on_device(load_base_model(recipe, quantized=False, tokenizer=tokenizer))
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
        with _base_of(model, recipe, tokenizer) as base:
            results["base"], generations["base"] = score_model(base, tokenizer, samples, recipe, teacher)
    if teacher is not None:
        results["teacher"], generations["teacher"] = score_model(teacher, tokenizer, samples, recipe)

    notes = []
    if "base" in results and recipe.objective.model_kind == "sequence-classification":
        notes.append(
            "base: its classification head is new and untrained (initialised from training.seed); its scores are "
            "those of the model training started from, not of a trained classifier"
        )
    predictions = _prediction_rows(samples, tokenizer, generations, is_encoder_decoder(model))
    if out is not None:
        artifacts.write_json(out, results)
        if predictions:
            artifacts.write_jsonl(_predictions_path(out, path), predictions)
    if label == "tuned" and out == path / artifacts.EVAL_FILE:
        write_run_report(RunDir(path))
    return EvalReport(results=results, predictions=predictions, out=out, examples=len(samples), notes=notes)


def _teacher_of(recipe: Recipe) -> PreTrainedModel | None:
    if not isinstance(recipe.objective, DistillSpec):
        return None
    teacher = recipe.objective.teacher
    return on_device(load_teacher(teacher, recipe.training.dtype, options_for(recipe, teacher)))


@contextlib.contextmanager
def _base_of(model: PreTrainedModel, recipe: Recipe, tokenizer: PreTrainedTokenizerBase):
    if _prompt_learning_config(model) is not None:
        # Virtual tokens leave the base model's weights as they were.
        yield model.get_base_model()
    elif hasattr(model, "disable_adapter"):
        # The base is the same weights with the adapter switched off: no second copy in memory.
        with model.disable_adapter():
            yield model
    else:
        torch.manual_seed(recipe.training.seed)
        yield on_device(load_base_model(recipe, quantized=False, tokenizer=tokenizer))


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
    """The recipe's metrics for one model, and its generations (None when no generation metric applies), as its
    objective scores them (see llmtune.objectives)."""
    # Imported here: the objectives import TRL, which generating and serving do not need.
    from llmtune.objectives import OBJECTIVES

    return OBJECTIVES[recipe.objective.name].score(model, tokenizer, samples, recipe, teacher)


def score_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    recipe: Recipe,
    teacher: PreTrainedModel | None = None,
) -> tuple[dict[str, float], list[str] | None]:
    """Perplexity on the held-out responses and the generation metrics (BLEU, ROUGE, exact match) of completing
    their prompts; the scoring of every objective trained on prompt + response rows.

    Args:
        teacher: for distillation, also report the mean KL(teacher || model) per response token (kl_to_teacher).
    """
    wanted = recipe.eval.metrics
    model.eval()
    results: dict[str, float] = {}
    if "perplexity" in wanted or teacher is not None:
        # Objectives without loss_on (grpo) are scored on their reference responses.
        loss_on = getattr(recipe.objective, "loss_on", "response")
        dataset, _ = encode_dataset(samples, tokenizer, recipe.data, loss_on, "eval data")
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
def sequence_logps(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[list[int]],
    labels: list[list[int]],
    batch_size: int,
) -> tuple[list[float], list[int]]:
    """Per row: the summed log-probability of its labels that are not -100, and how many there are."""
    logps, counts = [], []
    for ids, attn, lab in padded_batches(input_ids, batch_size, tokenizer.pad_token_id, model.device, labels):
        if is_encoder_decoder(model):
            # The decoder reads the labels shifted right behind its start token; logit t predicts label t.
            logits = model(input_ids=ids, attention_mask=attn, labels=lab).logits.float()
            targets = lab
        else:
            # Prompt tuning returns logits for its virtual tokens too; they come first.
            logits = model(input_ids=ids, attention_mask=attn).logits[:, -ids.size(1) :][:, :-1].float()
            targets = lab[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        logps.extend((-nll.sum(dim=1)).tolist())
        counts.extend((targets != IGNORE_INDEX).sum(dim=1).tolist())
    return logps, counts


def response_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: list[list[int]],
    labels: list[list[int]],
    batch_size: int,
) -> tuple[float, int]:
    """Summed negative log-likelihood of every label that is not -100, and how many there are."""
    logps, counts = sequence_logps(model, tokenizer, input_ids, labels, batch_size)
    total, count = -math.fsum(logps), sum(counts)
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
    for ids, attn, lab in padded_batches(input_ids, batch_size, tokenizer.pad_token_id, model.device, labels):
        student = model(input_ids=ids, attention_mask=attn).logits[:, -ids.size(1) :, :].float().log_softmax(-1)
        reference = teacher(input_ids=ids, attention_mask=attn).logits.float().log_softmax(-1)
        per_token = (reference.exp() * (reference - student)).sum(-1)[:, :-1]
        mask = lab[:, 1:] != IGNORE_INDEX
        total += per_token[mask].sum().item()
        count += int(mask.sum())
    return total / max(count, 1)


def _prompt_learning_config(model: PreTrainedModel):
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
    config = _prompt_learning_config(model)
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
    """Complete each prompt, left-padded in batches, stopping at EOS or the template's end of turn; greedy unless
    temperature > 0."""
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or 0, "top_p": top_p or 1.0}
    model.eval()
    texts = []
    for ids, attn, _ in padded_batches(prompts, batch_size, tokenizer.pad_token_id, model.device, left=True):
        generator, inputs = _generation_inputs(model, ids, attn)
        out = generator.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        # Given input ids, a decoder-only model returns them + the completion; otherwise only the new tokens.
        given = inputs["input_ids"].size(1) if "input_ids" in inputs and not is_encoder_decoder(model) else 0
        for row in out[:, given:]:
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


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
        model = on_device(model)
        recipe = load_recipe(path / artifacts.RECIPE_FILE)
        if recipe.objective.name == "classify":
            from llmtune.objectives.classify import classify_text

            return classify_text(model, tokenizer, prompt, recipe)
        if recipe.objective.name == "reward-model":
            raise LLMTuneError(
                f"{path} is a reward model: it scores responses and does not generate; `llmtune eval {path}` reports "
                "its preference accuracy, and a grpo recipe uses it as objective.reward_model"
            )
        data = recipe.data
        use_template = data.chat_template and data.format != "text"
        system_prompt = data.system_prompt
    else:
        tokenizer = load_tokenizer(target)
        kind = checkpoint_kind(target)
        model = on_device(load_model(target, kind=kind))
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
