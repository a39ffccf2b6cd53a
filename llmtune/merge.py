"""Merge a run's adapter into its base model and prove the merged model computes the same function.

`merge_in_memory` is the merge itself, shared by `merge-adapter` (which saves the result) and `export` (which
writes it as GGUF); `probe_batch` and `logits` are the check both make.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmtune import artifacts
from llmtune.artifacts import check_run_dir_free, open_run, staged_dir
from llmtune.batching import pad_batch
from llmtune.data import Sample, encode, encode_classification, encode_token_classification, split_samples
from llmtune.errors import LLMTuneError
from llmtune.masking import text_rows
from llmtune.models import auto_class, load_tuned
from llmtune.recipe.rules import DENOISING_OBJECTIVES
from llmtune.report import MODEL_CARD_FILE, model_card, read_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from llmtune.recipe import Recipe

# Probe prompts used when a run has no held-out data to probe with.
FALLBACK_PROBES = ["The quick brown fox jumps over the lazy dog.", "Hello! How are you today?"]


@dataclass
class MergeResult:
    out: Path
    max_abs_diff: float  # merged vs base+adapter
    reload_max_abs_diff: float  # merged vs merged reloaded from disk
    base_max_abs_diff: float  # merged vs base: zero would mean the adapter did nothing


@dataclass
class InMemoryMerge:
    """A run's adapter folded into its base, not yet saved anywhere, and the check that it computes the same."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    probes: dict[str, torch.Tensor]
    logits: torch.Tensor  # the merged model's on the probes
    max_abs_diff: float  # merged vs base+adapter
    base_max_abs_diff: float  # merged vs base
    quantized_max_abs_diff: float | None  # qlora: merged vs the 4-bit model it was trained as


def refuse_unmergeable(run_path: Path, run: artifacts.RunDir) -> None:
    """Raise unless the run saved an adapter that is a change to weights (LoRA and its kin)."""
    spec = run.recipe().method
    method = spec.name
    if (refusal := spec.merge_refusal(str(run_path))) is not None:
        raise LLMTuneError(f"{run_path}: {refusal}")
    if not run.adapter.is_dir():
        raise LLMTuneError(
            f"{run_path}: method {method!r} trained the weights themselves; "
            f"{run.model} is already a standalone model, no merge needed"
        )


def merge_in_memory(run_path: Path, tolerance: float = 1e-3) -> InMemoryMerge:
    """Fold the run's adapter into its base and check the merged logits against base+adapter on probe rows."""
    run = open_run(run_path)
    refuse_unmergeable(run_path, run)
    recipe = run.recipe()
    model, tokenizer = load_tuned(run_path)
    probes = probe_batch(recipe, tokenizer)
    quantized = None
    with torch.no_grad():
        with model.disable_adapter():
            base = logits(model, probes)
        if recipe.method.name == "qlora":
            # Merging into 4/8-bit layers would quantize the sum again; merge into the dequantized base instead.
            # The check below is then against the dequantized base + adapter, which the merge must reproduce;
            # the 4-bit kernels themselves round differently, and that difference is reported, not checked.
            quantized = logits(model, probes)
            model, _ = load_tuned(run_path, dequantize=True)
        tuned = logits(model, probes)
        merged = model.merge_and_unload()
        merged_logits = logits(merged, probes)
    diff = (merged_logits - tuned).abs().max().item()
    if not diff <= tolerance:
        raise LLMTuneError(
            f"merge check failed: merged logits differ from base+adapter by {diff:.3g} (tolerance {tolerance}); "
            "nothing was written"
        )
    return InMemoryMerge(
        model=merged,
        tokenizer=tokenizer,
        probes=probes,
        logits=merged_logits,
        max_abs_diff=diff,
        base_max_abs_diff=(merged_logits - base).abs().max().item(),
        quantized_max_abs_diff=None if quantized is None else (merged_logits - quantized).abs().max().item(),
    )


def merge_adapter(run_path: Path, out: Path, tolerance: float = 1e-3, overwrite: bool = False) -> MergeResult:
    run = open_run(run_path)
    refuse_unmergeable(run_path, run)
    recipe = run.recipe()
    out = out.expanduser().resolve()
    check_run_dir_free(out, overwrite)
    merge = merge_in_memory(run_path, tolerance)
    merged = merge.model

    with staged_dir(out) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        merge.tokenizer.save_pretrained(staging)
        metrics, evaluation = read_json(run.file(artifacts.METRICS_FILE)), read_json(run.file(artifacts.EVAL_FILE))
        (staging / MODEL_CARD_FILE).write_text(model_card(recipe, metrics, evaluation, merged=True))
        # Reload exactly as a user would, with plain transformers and no peft.
        reloaded = auto_class(recipe.objective.model_kind).from_pretrained(
            staging, dtype=merged.dtype, trust_remote_code=recipe.model_options.trust_remote_code
        )
        reloaded.to(merged.device)  # compared on one device: GPU and CPU kernels round bf16 differently
        with torch.no_grad():
            reload_diff = (logits(reloaded, merge.probes) - merge.logits).abs().max().item()
        if not reload_diff <= tolerance:
            raise LLMTuneError(
                f"merge check failed: reloaded merged model differs by {reload_diff:.3g}; nothing written"
            )
    if merge.quantized_max_abs_diff is not None:
        print(
            f"qlora: base dequantized to {merged.dtype} and merged; saved in {merged.dtype}. Max |logit diff| "
            f"against the 4-bit model: {merge.quantized_max_abs_diff:.3g} (4-bit kernel rounding)"
        )
    return MergeResult(
        out=out,
        max_abs_diff=merge.max_abs_diff,
        reload_max_abs_diff=reload_diff,
        base_max_abs_diff=merge.base_max_abs_diff,
    )


def probe_samples(recipe: Recipe | None) -> list[Sample]:
    """Up to four of the run's held-out rows: rows no training step saw. None for a model reference."""
    if recipe is None:
        return []
    _, held_out = split_samples(recipe)
    return held_out[:4]


def probe_ids(recipe: Recipe | None, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token ids of the probe rows, as training encoded them; the fixed probe texts when there are none."""
    held_out = probe_samples(recipe)
    if held_out and recipe.objective.name == "classify":
        # Tokenized as the classifier reads them: with its own special tokens, and no EOS that an encoder lacks.
        data, _ = encode_classification(held_out, tokenizer, recipe.data, recipe.objective.labels, "held-out")
        return data["input_ids"]
    if held_out and recipe.objective.name in DENOISING_OBJECTIVES:
        # Uncorrupted rows as those objectives cut them: an encoder's text carries no EOS to add.
        return text_rows(recipe, tokenizer, held_out)[0]
    if held_out and recipe.objective.name == "token-classify":
        # The words as the tagger reads them; the check compares every position's tag logits, not only first
        # sub-tokens.
        data, _ = encode_token_classification(held_out, tokenizer, recipe.data, recipe.objective.labels, "held-out")
        return data["input_ids"]
    prompts = [encode(s, tokenizer)[0] for s in held_out]
    return prompts or [tokenizer(text)["input_ids"] for text in FALLBACK_PROBES]


def probe_batch(recipe: Recipe | None, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    ids, attn = pad_batch(probe_ids(recipe, tokenizer), tokenizer.pad_token_id, left=False)
    batch = {"input_ids": ids, "attention_mask": attn}
    if recipe is not None and recipe.objective.model_kind == "seq2seq-lm":
        # An encoder-decoder needs decoder inputs too; the probe ids serve, as both sides of the check get the same.
        batch["decoder_input_ids"] = ids
    return batch


def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on `batch` in float32 on the CPU, zero at padding positions."""
    model.eval()
    # A QLoRA run's models sit where bitsandbytes put them (the GPU), the reloaded merge on the CPU.
    out = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
    if out.dim() == 2:  # one score per sequence (classification and reward heads): nothing to mask
        return out
    return out * batch["attention_mask"][..., None]
