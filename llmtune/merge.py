"""Merge a run's adapter into its base model and prove the merged model computes the same function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llmtune import artifacts
from llmtune.artifacts import check_run_dir_free, open_run, staged_dir
from llmtune.batching import pad_batch
from llmtune.data import encode, encode_classification, split_samples
from llmtune.errors import LLMTuneError
from llmtune.models import auto_class, load_tuned
from llmtune.report import MODEL_CARD_FILE, model_card, read_json

# Probe prompts used when a run has no held-out data to probe with.
_FALLBACK_PROBES = ["The quick brown fox jumps over the lazy dog.", "Hello! How are you today?"]


@dataclass
class MergeResult:
    out: Path
    max_abs_diff: float  # merged vs base+adapter
    reload_max_abs_diff: float  # merged vs merged reloaded from disk
    base_max_abs_diff: float  # merged vs base: zero would mean the adapter did nothing


def merge_adapter(run_path: Path, out: Path, tolerance: float = 1e-3, overwrite: bool = False) -> MergeResult:
    run = open_run(run_path)
    recipe = run.recipe()
    spec = recipe.method
    method = spec.name
    if (refusal := spec.merge_refusal(str(run_path))) is not None:
        raise LLMTuneError(f"{run_path}: {refusal}")
    if not run.adapter.is_dir():
        raise LLMTuneError(
            f"{run_path}: method {method!r} trained the weights themselves; "
            f"{run.model} is already a standalone model, no merge needed"
        )
    out = out.expanduser().resolve()
    check_run_dir_free(out, overwrite)
    model, tokenizer = load_tuned(run_path)
    probes = _probe_batch(run, tokenizer)

    with torch.no_grad():
        with model.disable_adapter():
            base = _logits(model, probes)
        if method == "qlora":
            # Merging into 4/8-bit layers would quantize the sum again; merge into the dequantized base instead.
            # The check below is then against the dequantized base + adapter, which the merge must reproduce;
            # the 4-bit kernels themselves round differently, and that difference is reported, not checked.
            quantized = _logits(model, probes)
            model, _ = load_tuned(run_path, dequantize=True)
        tuned = _logits(model, probes)
        merged = model.merge_and_unload()
        merged_logits = _logits(merged, probes)
    diff = (merged_logits - tuned).abs().max().item()
    base_diff = (merged_logits - base).abs().max().item()
    if not diff <= tolerance:
        raise LLMTuneError(
            f"merge check failed: merged logits differ from base+adapter by {diff:.3g} (tolerance {tolerance}); "
            "nothing was written"
        )

    with staged_dir(out) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        metrics, evaluation = read_json(run.file(artifacts.METRICS_FILE)), read_json(run.file(artifacts.EVAL_FILE))
        (staging / MODEL_CARD_FILE).write_text(model_card(recipe, metrics, evaluation, merged=True))
        # Reload exactly as a user would, with plain transformers and no peft.
        reloaded = auto_class(recipe.objective.model_kind).from_pretrained(
            staging, dtype=merged.dtype, trust_remote_code=recipe.model_options.trust_remote_code
        )
        reloaded.to(merged.device)  # compared on one device: GPU and CPU kernels round bf16 differently
        with torch.no_grad():
            reload_diff = (_logits(reloaded, probes) - merged_logits).abs().max().item()
        if not reload_diff <= tolerance:
            raise LLMTuneError(
                f"merge check failed: reloaded merged model differs by {reload_diff:.3g}; nothing written"
            )
    if method == "qlora":
        print(
            f"qlora: base dequantized to {merged.dtype} and merged; saved in {merged.dtype}. Max |logit diff| "
            f"against the 4-bit model: {(merged_logits - quantized).abs().max().item():.3g} (4-bit kernel rounding)"
        )
    return MergeResult(out=out, max_abs_diff=diff, reload_max_abs_diff=reload_diff, base_max_abs_diff=base_diff)


def _probe_batch(run: artifacts.RunDir, tokenizer) -> dict[str, torch.Tensor]:
    recipe = run.recipe()
    _, held_out = split_samples(recipe)
    if held_out and recipe.objective.name == "classify":
        # Tokenized as the classifier reads them: with its own special tokens, and no EOS that an encoder lacks.
        data, _ = encode_classification(held_out[:4], tokenizer, recipe.data, recipe.objective.labels, "held-out")
        prompts = data["input_ids"]
    else:
        prompts = [encode(s, tokenizer)[0] for s in held_out[:4]]
    if not prompts:
        prompts = [tokenizer(text)["input_ids"] for text in _FALLBACK_PROBES]
    ids, attn = pad_batch(prompts, tokenizer.pad_token_id, left=False)
    batch = {"input_ids": ids, "attention_mask": attn}
    if recipe.objective.model_kind == "seq2seq-lm":
        # An encoder-decoder needs decoder inputs too; the probe ids serve, as both sides of the check get the same.
        batch["decoder_input_ids"] = ids
    return batch


def _logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    # A QLoRA run's models sit where bitsandbytes put them (the GPU), the reloaded merge on the CPU.
    logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
    if logits.dim() == 2:  # one score per sequence (classification and reward heads): nothing to mask
        return logits
    return logits * batch["attention_mask"][..., None]
