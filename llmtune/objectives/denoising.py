"""Denoising objectives: masked LM (BERT, objective mlm) and span corruption (T5, objective span-corruption).

Each text is cut into rows of at most data.max_length tokens; a row is corrupted as llmtune.masking draws it and
the model restores it, with the loss on the restored tokens only. Training rows are corrupted in the collator,
afresh each epoch (RoBERTa's dynamic masking), from (training.seed, epoch, row); held-out rows once, from
(training.seed, held-out, row), so base and tuned models are scored on the same masks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import Trainer, TrainerCallback

from llmtune import masking, metrics, progress
from llmtune.batching import pad_rows, padded_batches
from llmtune.data import IGNORE_INDEX, PreparedData, Sample, load_splits, prepare_splits
from llmtune.errors import LLMTuneError
from llmtune.generation import is_encoder_decoder
from llmtune.objectives.base import _rows_trainer
from llmtune.recipe import Recipe
from llmtune.training import GuardedTrainerMixin

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmtune.accel import SpeedPlan

# A row corrupted: (token ids, salt) -> (model input, labels).
Corrupter = Callable[[list[int], "int | str"], tuple[list[int], list[int]]]


# --- rows --------------------------------------------------------------------------------------------


def corrupter(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> Corrupter:
    """How the recipe's objective corrupts one row, drawn from (training.seed, salt, the row's tokens)."""
    objective, seed = recipe.objective, recipe.training.seed
    if objective.name == "mlm":
        specials, vocab = masking.special_ids(tokenizer), len(tokenizer)

        def mask(ids: list[int], salt: int | str) -> tuple[list[int], list[int]]:
            rng = masking.row_rng(seed, salt, ids)
            return masking.mask_tokens(ids, objective.mlm_probability, tokenizer.mask_token_id, specials, vocab, rng)

        return mask
    if tokenizer.eos_token_id is None:
        raise LLMTuneError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end inputs and targets with")
    sentinels = masking.sentinel_ids(tokenizer)
    density, mean_span = objective.noise_density, objective.mean_noise_span_length

    def corrupt(ids: list[int], salt: int | str) -> tuple[list[int], list[int]]:
        noise = masking.noise_span_mask(len(ids), density, mean_span, masking.row_rng(seed, salt, ids))
        return masking.corrupt_spans(ids, noise, sentinels, tokenizer.eos_token_id)

    return corrupt


def prepare_denoising(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Training rows uncorrupted (the collator corrupts them each epoch), held-out rows corrupted once."""
    corrupt = corrupter(recipe, tokenizer)

    def encode(held_out: bool) -> Callable[[list[Sample], str], tuple[Dataset, dict[str, Any]]]:
        from datasets import Dataset

        def rows_of(samples: list[Sample], source: str) -> tuple[Dataset, dict[str, Any]]:
            rows, skipped = masking.text_rows(recipe, tokenizer, samples)
            if not rows:
                raise LLMTuneError(f"{source}: every text is shorter than 2 tokens; there is nothing to corrupt")
            if recipe.objective.name == "span-corruption":
                objective = recipe.objective
                longest = max(len(r) for r in rows)
                masking.check_sentinels(tokenizer, longest, objective.noise_density, objective.mean_noise_span_length)
            # The count of corrupted tokens is the same every epoch; only their positions change.
            corrupted = [corrupt(ids, masking.HELD_OUT if held_out else 0) for ids in rows]
            counts = {
                "rows": len(rows),
                "documents": len(samples),
                "truncated": 0,
                "dropped": skipped,
                "tokens": sum(len(r) for r in rows),
                "loss_tokens": sum(sum(t != IGNORE_INDEX for t in labels) for _, labels in corrupted),
            }
            if not held_out:
                return Dataset.from_dict({"input_ids": rows}), counts
            inputs, labels = zip(*corrupted, strict=True)
            return Dataset.from_dict({"input_ids": list(inputs), "labels": list(labels)}), counts

        return rows_of

    train, held_out = load_splits(recipe)
    return prepare_splits(train, held_out, encode(False), encode(True))


# --- training ----------------------------------------------------------------------------------------


class CorruptingCollator:
    """Pads a batch; a training row (one without labels yet) is corrupted first, with the masks of `epoch`."""

    def __init__(self, corrupt: Corrupter, pad_token_id: int):
        self.corrupt = corrupt
        self.pad = pad_rows(pad_token_id)
        self.epoch = 0

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        done = []
        for row in rows:
            if "labels" not in row:
                inputs, labels = self.corrupt(row["input_ids"], self.epoch)
                row = {"input_ids": inputs, "labels": labels}
            done.append(row)
        return self.pad(done)


class _MaskEpoch(TrainerCallback):
    """Tells the collator the epoch it draws for. The Trainer restores state.epoch when it resumes, so a resumed
    run draws each row's masks as the uninterrupted run would have, whatever batches were fetched ahead."""

    def __init__(self, collator: CorruptingCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch or 0)


class DenoisingTrainer(GuardedTrainerMixin, Trainer):
    """transformers' Trainer with llmtune's checkpoints and guards: the model's own cross-entropy on the labels."""


def build_denoising(
    recipe: Recipe,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    output_dir: Path,
    callbacks: list[TrainerCallback],
    plan: SpeedPlan,
) -> Trainer:
    name = recipe.objective.name
    if is_encoder_decoder(model) != (name == "span-corruption"):
        # AutoModelForMaskedLM also loads BART, an encoder-decoder; span corruption needs one.
        wanted = "an encoder-decoder (T5 family, tiny:t5)" if name == "span-corruption" else "an encoder (BERT family)"
        raise LLMTuneError(f"objective {name}: model {recipe.model!r} is not {wanted}")
    collator = CorruptingCollator(corrupter(recipe, tokenizer), tokenizer.pad_token_id)
    callbacks = [_MaskEpoch(collator), *callbacks]
    trainer = _rows_trainer(DenoisingTrainer, recipe, model, tokenizer, data, output_dir, callbacks, plan, collator)
    # BERT and T5 return a plain mean loss and ignore num_items_in_batch; left True, the Trainer would not divide
    # that loss by grad_accum (see seq2seq.build_seq2seq).
    trainer.model_accepts_loss_kwargs = False
    return trainer


# --- scoring -----------------------------------------------------------------------------------------


def score_denoising(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    recipe: Recipe,
    teacher: PreTrainedModel | None = None,
) -> tuple[dict[str, float], None]:
    """Perplexity and accuracy of the restored tokens on the held-out masks. mlm: over the chosen tokens;
    span-corruption: perplexity over the whole target (as T5's loss), accuracy over the span tokens alone (its
    sentinels and EOS are given away by the input's layout)."""
    corrupt = corrupter(recipe, tokenizer)
    rows, _ = masking.text_rows(recipe, tokenizer, samples)
    inputs, labels = zip(*(corrupt(ids, masking.HELD_OUT) for ids in rows), strict=True)
    skipped = set(masking.sentinel_ids(tokenizer)) | {tokenizer.eos_token_id}
    skipped = skipped if recipe.objective.name == "span-corruption" else set()
    nll, n, correct, counted = restored_scores(
        model, tokenizer, list(inputs), list(labels), recipe.eval.batch_size, skipped
    )
    if n == 0:
        raise LLMTuneError("evaluation: the held-out rows have no corrupted tokens")
    results = {"accuracy": correct / max(counted, 1), "perplexity": metrics.perplexity(nll, n)}
    return {**{m: results[m] for m in recipe.eval.metrics}, "loss": nll / n}, None


@torch.no_grad()
def restored_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: list[list[int]],
    labels: list[list[int]],
    batch_size: int,
    not_counted: set[int],
) -> tuple[float, int, int, int]:
    """Summed NLL of the labels that are not -100 and their number, then how many of them (less `not_counted`
    tokens) are the model's most probable token, and of how many."""
    model.eval()
    nll, n, correct, counted = 0.0, 0, 0, 0
    excluded = torch.tensor(sorted(not_counted), dtype=torch.long, device=model.device)
    with progress.rows(len(inputs), "score") as advance:
        for ids, attn, lab in padded_batches(inputs, batch_size, tokenizer.pad_token_id, model.device, labels):
            # An encoder-decoder's decoder reads the labels shifted right; logit t predicts label t either way.
            extra = {"labels": lab} if is_encoder_decoder(model) else {}
            logits = model(input_ids=ids, attention_mask=attn, **extra).logits.float()
            scored = lab != IGNORE_INDEX
            nll += torch.nn.functional.cross_entropy(logits[scored], lab[scored], reduction="sum").item()
            n += int(scored.sum())
            scored &= ~torch.isin(lab, excluded)
            correct += int((logits.argmax(-1)[scored] == lab[scored]).sum())
            counted += int(scored.sum())
            advance(ids.size(0))
    return nll, n, correct, counted


# --- fill-mask: `llmtune generate` on an mlm run -------------------------------------------------------


@torch.no_grad()
def fill_mask(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, top_k: int = 5) -> str:
    """The text with each mask token replaced by the model's most probable token, then one line per mask token
    with its `top_k` candidates and their probabilities."""
    mask = tokenizer.mask_token
    if mask is None or mask not in text:
        raise LLMTuneError(
            f"the prompt has no {mask}: a masked language model predicts the tokens written as {mask}, e.g. "
            f"'The ship sailed {mask} miles'"
        )
    prefix, suffix = masking.special_wrap(tokenizer)
    ids = prefix + tokenizer(text, add_special_tokens=False)["input_ids"] + suffix
    model.eval()
    logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float()
    filled, lines = list(ids), []
    for k, i in enumerate(i for i, t in enumerate(ids) if t == tokenizer.mask_token_id):
        top = logits[i].softmax(-1).topk(top_k)
        filled[i] = int(top.indices[0])
        ranked = ", ".join(
            f"{tokenizer.decode([int(t)]).strip()!r} {p:.3f}" for t, p in zip(top.indices, top.values, strict=True)
        )
        lines.append(f"{mask} {k + 1}: {ranked}")
    return "\n".join([tokenizer.decode(filled, skip_special_tokens=True), *lines])
