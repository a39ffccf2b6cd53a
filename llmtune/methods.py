"""The tuning-method registry: recipe `method.name` -> builder(spec, model) -> model ready to train."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from llmtune.errors import LLMTuneError, first_line
from llmtune.recipe import FullSpec, LoraSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def build_lora(spec: LoraSpec, model: PreTrainedModel) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=spec.modules_to_save or None,
        bias=spec.bias,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        # peft names the missing modules; the user needs to know which recipe key to change.
        raise LLMTuneError(f"method.target_modules / modules_to_save: {first_line(e)}") from None


def build_full(spec: FullSpec, model: PreTrainedModel) -> PreTrainedModel:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


METHODS: dict[str, Callable] = {
    "lora": build_lora,
    "full": build_full,
}

# Methods whose run directory holds an adapter over an unchanged base (the rest save a whole model).
ADAPTER_METHODS = frozenset({"lora"})
