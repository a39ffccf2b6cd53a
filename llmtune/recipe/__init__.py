"""The recipe schema and its loader.

Everything that can be checked without loading a model is checked here, so a typo fails in a second with the file
and key path instead of after a minute of model loading. One module per concern: methods, objectives, data,
training (with eval and output), speed, the cross-field rules, and the loader.
"""

from llmtune.recipe.data import DataSpec, is_local_data_ref
from llmtune.recipe.loader import dump_recipe, load_recipe, validate_recipe_dict
from llmtune.recipe.methods import (
    METHOD_SPECS,
    AdapterSpec,
    BitFitSpec,
    DoraSpec,
    FullSpec,
    HeadSpec,
    IA3Spec,
    LayersSpec,
    LoraSpec,
    MethodSpec,
    PrefixSpec,
    PromptSpec,
    PTuningSpec,
    QLoraSpec,
)
from llmtune.recipe.models import ModelOptionsSpec
from llmtune.recipe.objectives import OBJECTIVE_SPECS, DistillSpec, GRPOSpec, ObjectiveSpec
from llmtune.recipe.schema import Recipe
from llmtune.recipe.speed import SpeedSpec
from llmtune.recipe.training import EvalSpec, OutputSpec, PushSpec, TrainingSpec

__all__ = [
    "METHOD_SPECS",
    "OBJECTIVE_SPECS",
    "AdapterSpec",
    "BitFitSpec",
    "DataSpec",
    "DistillSpec",
    "DoraSpec",
    "EvalSpec",
    "FullSpec",
    "GRPOSpec",
    "HeadSpec",
    "IA3Spec",
    "LayersSpec",
    "LoraSpec",
    "MethodSpec",
    "ModelOptionsSpec",
    "ObjectiveSpec",
    "OutputSpec",
    "PushSpec",
    "PTuningSpec",
    "PrefixSpec",
    "PromptSpec",
    "QLoraSpec",
    "Recipe",
    "SpeedSpec",
    "TrainingSpec",
    "dump_recipe",
    "is_local_data_ref",
    "load_recipe",
    "validate_recipe_dict",
]
