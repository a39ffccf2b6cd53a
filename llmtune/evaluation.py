"""Run a model over held-out data, by scoring (perplexity) and by generation (BLEU, ROUGE, exact match)."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmtune import artifacts, metrics, progress
from llmtune.accel import on_device
from llmtune.artifacts import RunDir, is_run_dir
from llmtune.batching import padded_batches
from llmtune.data import IGNORE_INDEX, Sample, encode_dataset, encode_prompt, prepare_tokenizer, split_samples
from llmtune.errors import LLMTuneError
from llmtune.generation import Sampling, generate_texts, is_encoder_decoder, prompt_learning_config
from llmtune.models import (
    NEW_HEAD_KINDS,
    load_base_model,
    load_config,
    load_recipe_tokenizer,
    load_teacher,
    load_tuned,
    options_for,
)
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
    notes: list[str] = field(default_factory=list)  # what a reader must know to read the numbers


def evaluate(
    target: str | Path,
    compare_base: bool = False,
    out: Path | None = None,
    overrides: list[str] | None = None,
    prompting: list[str] | None = None,
) -> EvalReport:
    """Evaluate a run directory (tuned, and base with `compare_base`) or a recipe's base model.

    Args:
        prompting: prompting baselines to score too (see llmtune.prompting); given, they replace eval.prompting.
    """
    path = Path(target)
    if prompting is not None:
        overrides = [*(overrides or []), f"eval.prompting={json.dumps(prompting)}"]
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
    with progress.scoring(label):
        results[label], generations[label] = score_model(model, tokenizer, samples, recipe, teacher)
    if compare_base:
        with _base_of(model, recipe, tokenizer) as base, progress.scoring("base"):
            results["base"], generations["base"] = score_model(base, tokenizer, samples, recipe, teacher)
    if teacher is not None:
        with progress.scoring("teacher"):
            results["teacher"], generations["teacher"] = score_model(teacher, tokenizer, samples, recipe)

    notes, prompts = [], {}
    if recipe.eval.prompting:
        prompts = _score_prompting(model, recipe, tokenizer, samples, label, results, generations, notes)
    if "base" in results and recipe.objective.model_kind in NEW_HEAD_KINDS:
        notes.append(
            "base: its classification head is new and untrained (initialised from training.seed); its scores are "
            "those of the model training started from, not of a trained classifier"
        )
    if "base" in results and recipe.objective.name == "mlm" and not _has_mlm_head(recipe):
        notes.append(
            f"base: {recipe.model} ships no masked-LM head, so its head is new (initialised from training.seed); "
            "its scores are those of the model training started from, not of a pretrained masked LM"
        )
    if samples[0].words is not None and (cut := sum(tag is None for row in generations[label] for tag in row)):
        words = sum(len(s.words) for s in samples)
        notes.append(
            f"{cut} of {words} held-out words lie past data.max_length={recipe.data.max_length} tokens and are not "
            "scored (their prediction is null in the predictions file); raise data.max_length to score them"
        )
    predictions = _prediction_rows(samples, tokenizer, generations, is_encoder_decoder(model), prompts)
    if out is not None:
        artifacts.write_json(out, results)
        if predictions:
            artifacts.write_jsonl(_predictions_path(out, path), predictions)
    if label == "tuned" and out == path / artifacts.EVAL_FILE:
        write_run_report(RunDir(path))
    return EvalReport(results=results, predictions=predictions, out=out, examples=len(samples), notes=notes)


def _has_mlm_head(recipe: Recipe) -> bool:
    """Whether the checkpoint was saved with a masked-LM head (sentence encoders such as MiniLM drop it)."""
    architectures = load_config(recipe.model, recipe.model_options).architectures or []
    return any(name.endswith(("ForMaskedLM", "ForPreTraining")) for name in architectures)


def _teacher_of(recipe: Recipe) -> PreTrainedModel | None:
    if not isinstance(recipe.objective, DistillSpec):
        return None
    teacher = recipe.objective.teacher
    return on_device(load_teacher(teacher, recipe.training.dtype, options_for(recipe, teacher)))


def _score_prompting(
    model: PreTrainedModel,
    recipe: Recipe,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    label: str,
    results: dict[str, dict[str, float]],
    generations: dict[str, list[str] | None],
    notes: list[str],
) -> dict[str, list[str]]:
    """Score the base model on each prompting mode's rows into `results` and `generations`; returns the prompts."""
    from llmtune.prompting import decoded_prompts, prompted_sets, same_inputs

    encoder_decoder = is_encoder_decoder(model)
    sets = prompted_sets(recipe, len(samples), encoder_decoder)
    base = contextlib.nullcontext(model) if label == "base" else _base_of(model, recipe, tokenizer)
    with base as base_model:
        for mode, prompted in sets.samples.items():
            if mode == "zero-shot" and "base" in results:
                if same_inputs(prompted, sets.tokenizer, samples, tokenizer, encoder_decoder):
                    # The same model given the same token ids: computing it again would only cost time.
                    results[mode], generations[mode] = dict(results["base"]), generations["base"]
                    notes.append(
                        "zero-shot: the recipe trains with the base model's own prompt format, so its prompts are "
                        "the base column's and so are its numbers"
                    )
                    continue
            with progress.scoring(mode):
                results[mode], generations[mode] = score_model(base_model, sets.tokenizer, prompted, recipe)
    shots = [m for m in sets.samples if m != "zero-shot"]
    if shots:
        notes.append(
            f"{', '.join(shots)}: the base model with worked examples from the training data in front of each prompt "
            "(drawn per row by training.seed); perplexity is over each row's own answer only"
        )
    return decoded_prompts(sets, encoder_decoder)


@contextlib.contextmanager
def _base_of(model: PreTrainedModel, recipe: Recipe, tokenizer: PreTrainedTokenizerBase):
    if prompt_learning_config(model) is not None:
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
    generations: dict[str, list[Any] | None],
    encoder_decoder: bool,
    prompts: dict[str, list[str]],
) -> list[dict[str, Any]]:
    """One row per held-out example: the prompt as training formatted it, each prompting column's own prompt
    (`prompts`, when there are any), the reference and every column's prediction."""
    if any(g is None for g in generations.values()):
        return []
    rows = []
    for i, sample in enumerate(samples):
        if sample.words is not None:  # token classification: a tag per word
            predicted = {name: gens[i] for name, gens in generations.items()}
            rows.append({"tokens": sample.words, "tags": sample.tags, "prediction": predicted})
            continue
        prompt, reference = sample.prompt_and_reference()
        row = {"prompt": tokenizer.decode(encode_prompt(prompt, tokenizer, encoder_decoder))}
        if prompts:
            row["prompts"] = {mode: texts[i] for mode, texts in prompts.items()}
        row.update(reference=reference, prediction={name: gens[i] for name, gens in generations.items()})
        rows.append(row)
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
    spec = recipe.eval
    sampling = Sampling(
        max_new_tokens=spec.max_new_tokens, num_beams=spec.num_beams, repetition_penalty=spec.repetition_penalty
    )
    with progress.rows(len(prompts), "generate") as advance:
        predictions = generate_texts(model, tokenizer, prompts, sampling, spec.batch_size, progress=advance)
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
    with progress.rows(len(input_ids), "score") as advance:
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
            advance(ids.size(0))
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
    with progress.rows(len(input_ids), "teacher KL") as advance:
        for ids, attn, lab in padded_batches(input_ids, batch_size, tokenizer.pad_token_id, model.device, labels):
            student = model(input_ids=ids, attention_mask=attn).logits[:, -ids.size(1) :, :].float().log_softmax(-1)
            reference = teacher(input_ids=ids, attention_mask=attn).logits.float().log_softmax(-1)
            per_token = (reference.exp() * (reference - student)).sum(-1)[:, :-1]
            mask = lab[:, 1:] != IGNORE_INDEX
            total += per_token[mask].sum().item()
            count += int(mask.sum())
            advance(ids.size(0))
    return total / max(count, 1)
