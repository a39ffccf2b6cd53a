"""The whole recipe: its sections composed, defaults resolved, then every cross-field rule checked."""

from __future__ import annotations

from pydantic import Field, model_validator

from llmtune.recipe.common import Spec
from llmtune.recipe.data import DataSpec
from llmtune.recipe.methods import MethodSpec
from llmtune.recipe.models import ModelOptionsSpec
from llmtune.recipe.objectives import ObjectiveSpec, SFTSpec
from llmtune.recipe.rules import RULES, resolve_defaults
from llmtune.recipe.speed import SpeedSpec
from llmtune.recipe.training import EvalSpec, OutputSpec, TrainingSpec


class Recipe(Spec):
    model: str = Field(description="hub id | local dir | local .gguf file | builtin:NAME | tiny:ARCH")
    tokenizer: str | None = Field(None, description="tokenizer reference when it differs from the model's")
    model_options: ModelOptionsSpec = Field(default_factory=ModelOptionsSpec)
    method: MethodSpec
    objective: ObjectiveSpec = Field(default_factory=lambda: SFTSpec(name="sft"))
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    speed: SpeedSpec = Field(default_factory=SpeedSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="after")
    def _resolve_and_check(self) -> Recipe:
        resolve_defaults(self)
        for rule in RULES:
            rule(self)
        return self
