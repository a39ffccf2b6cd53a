"""The DeepSpeed config a recipe names, checked against the recipe when it loads.

transformers fills the config's "auto" values from the training arguments and raises on a mismatch only once
the model is loaded and every process has started; these checks say the same at `llmtune validate` time, in
one line naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtune.errors import LLMTuneError
from llmtune.recipe.training import TrainingSpec

STAGES = (0, 1, 2, 3)
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def check_deepspeed_config(path: Path, training: TrainingSpec) -> None:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise LLMTuneError(f"{path}: training.deepspeed cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise LLMTuneError(f"{path}: training.deepspeed is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(config, dict):
        raise LLMTuneError(f"{path}: training.deepspeed must hold a JSON object of DeepSpeed options")
    _check_zero(path, config.get("zero_optimization", {}))
    for key, value, what in (
        ("train_micro_batch_size_per_gpu", training.batch_size, "training.batch_size"),
        ("gradient_accumulation_steps", training.grad_accum, "training.grad_accum"),
        ("gradient_clipping", training.max_grad_norm, "training.max_grad_norm"),
    ):
        _check_matches(path, config, key, value, what)
    _check_train_batch_size(path, config.get("train_batch_size", "auto"), training)
    if _enabled(config, "fp16") is True:
        raise LLMTuneError(
            f"{path}: fp16.enabled is true, but llmtune trains in training.dtype with bfloat16 autocast; "
            'set fp16.enabled to false or "auto" and use training.bf16'
        )
    bf16 = _enabled(config, "bf16")
    if isinstance(bf16, bool) and isinstance(training.bf16, bool) and bf16 != training.bf16:
        raise LLMTuneError(
            f"{path}: bf16.enabled is {str(bf16).lower()} but training.bf16 is {str(training.bf16).lower()}; "
            'set bf16.enabled to "auto" (filled from the recipe)'
        )


def _enabled(config: dict[str, Any], precision: str) -> Any:
    section = config.get(precision, {})
    return section.get("enabled", "auto") if isinstance(section, dict) else section


def _check_zero(path: Path, zero: Any) -> None:
    if not isinstance(zero, dict):
        raise LLMTuneError(f"{path}: zero_optimization must be an object with a 'stage'")
    stage = zero.get("stage", 0)
    if stage not in STAGES or isinstance(stage, bool):
        raise LLMTuneError(f"{path}: zero_optimization.stage is {stage!r}; use 0, 1, 2 or 3")
    for offload in ("offload_optimizer", "offload_param"):
        section = zero.get(offload)
        if section is None:
            continue
        device = section.get("device", "none") if isinstance(section, dict) else section
        if device not in OFFLOAD_DEVICES:
            raise LLMTuneError(
                f"{path}: zero_optimization.{offload}.device is {device!r}; use one of {', '.join(OFFLOAD_DEVICES)}"
            )
        if offload == "offload_param" and device != "none" and stage != 3:
            raise LLMTuneError(
                f"{path}: zero_optimization.offload_param needs stage 3 (parameters are partitioned only there), "
                f"but stage is {stage}; set stage to 3 or use offload_optimizer"
            )
        if offload == "offload_optimizer" and device != "none" and stage == 0:
            raise LLMTuneError(
                f"{path}: zero_optimization.offload_optimizer needs stage 1, 2 or 3, but stage is 0; raise the stage"
            )
        if device == "nvme" and not section.get("nvme_path"):
            raise LLMTuneError(f"{path}: zero_optimization.{offload}.device is nvme but no nvme_path is set")


def _check_matches(path: Path, config: dict[str, Any], key: str, value: float, what: str) -> None:
    given = config.get(key, "auto")
    if given != "auto" and given != value:
        raise LLMTuneError(
            f'{path}: {key} is {given!r} but {what} is {value}; set it to "auto" (filled from the recipe) '
            f"or make them equal"
        )


def _check_train_batch_size(path: Path, given: Any, training: TrainingSpec) -> None:
    """DeepSpeed's global batch is micro-batch x accumulation x processes; the process count comes at launch."""
    per_process = training.batch_size * training.grad_accum
    if given == "auto":
        return
    if not isinstance(given, int) or isinstance(given, bool) or given <= 0 or given % per_process:
        raise LLMTuneError(
            f"{path}: train_batch_size is {given!r}, which is not training.batch_size x training.grad_accum "
            f'({per_process}) times a process count; set it to "auto" (filled from the recipe)'
        )
