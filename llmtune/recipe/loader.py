"""Reading a recipe: YAML, `--set` overrides, paths relative to the recipe file, and one-line errors that name
the key, suggest the right one and never show pydantic's traceback.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from llmtune.errors import LLMTuneError, first_line
from llmtune.recipe.common import models_in, spec_name
from llmtune.recipe.data import is_local_data_ref
from llmtune.recipe.deepspeed import check_deepspeed_config
from llmtune.recipe.models import is_gguf_ref
from llmtune.recipe.schema import Recipe
from llmtune.recipe.speed import SpeedSpec
from llmtune.templates import is_jinja


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe; make its local paths absolute.

    Args:
        path: the YAML file.
        overrides: `a.b=value` strings; the value is parsed as YAML, then typed by the schema.
    """
    try:
        return _load_recipe(Path(path), overrides)
    except LLMTuneError as e:
        # Keys and values can contain newlines; the message must stay one line.
        raise LLMTuneError(str(e).replace("\r", "\\r").replace("\n", "\\n")) from None
    except (RecursionError, ValueError, OSError) as e:
        # Pathological documents: nesting past Python's recursion limit, integers past its digit limit,
        # paths longer than the filesystem allows.
        raise LLMTuneError(f"{path}: cannot use this recipe: {type(e).__name__}: {first_line(e)[:200]}") from None


def _load_recipe(path: Path, overrides: list[str] | None) -> Recipe:
    if not path.is_file():
        raise LLMTuneError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise LLMTuneError(f"{path}: not valid YAML{line}: {first_line(e)}") from None
    if not isinstance(raw, dict):
        raise LLMTuneError(f"{path}: a recipe must be a YAML mapping with keys model, method, data, ...")
    texts = {}
    for item in overrides or []:
        texts.update(_apply_override(raw, item, path))
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        # `--set output.dir=2024` parses as an int; where the schema wants text, use the text as typed.
        retry = [err["loc"] for err in e.errors() if err["type"] == "string_type" and _user_path(err["loc"]) in texts]
        for loc in retry:
            _set_path(raw, _user_path(loc), texts[_user_path(loc)])
        recipe = validate_recipe_dict(raw, source=str(path))
    return _resolve_paths(recipe, path.parent)


def validate_recipe_dict(raw: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        # A value that fits no member of a union fails once per member; one message per key is enough.
        messages = {}
        for err in e.errors():
            messages.setdefault(tuple(_walk(err["loc"])[0]), _describe(err))
        raise LLMTuneError(f"{source}: " + "; ".join(messages.values())) from None


def _apply_override(raw: dict[str, Any], item: str, path: Path) -> dict[tuple[str, ...], str]:
    """Set one `a.b=value` in the raw recipe; returns {key path: the value's text} for typing it later."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise LLMTuneError(f"--set {item!r}: expected KEY=VALUE, e.g. --set training.max_steps=5")
    parts = tuple(key.strip().split("."))
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    _set_path(raw, parts, parsed, what=f"--set {item!r}", source=path)
    return {parts: value}


def _set_path(
    raw: dict[str, Any], parts: tuple[str, ...], value: Any, what: str = "", source: Path | None = None
) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise LLMTuneError(f"{what}: {'.'.join(parts[: i + 1])} in {source} is not a mapping")
        node = child
    node[parts[-1]] = value


def _user_path(loc: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(_walk(loc)[0])


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    data = recipe.data
    updates = {}
    for field in ("train", "eval"):
        value = getattr(data, field)
        if isinstance(value, str):
            updates[field] = _resolve_data_ref(value, base, f"data.{field}")
        elif value is not None:
            updates[field] = [
                source.model_copy(update={"path": _resolve_data_ref(source.path, base, f"data.{field}[{i}]")})
                for i, source in enumerate(value)
            ]
    template = data.chat_template
    if isinstance(template, str) and template.endswith(".jinja") and not is_jinja(template):
        local = (base / template).expanduser()
        if not local.is_file():
            raise LLMTuneError(f"{local}: data.chat_template file not found (paths are relative to the recipe file)")
        updates["chat_template"] = str(local.resolve())
    training = recipe.training
    if training.deepspeed is not None:
        config = base / training.deepspeed
        if not config.is_file():
            raise LLMTuneError(f"{config}: training.deepspeed file not found (paths are relative to the recipe file)")
        check_deepspeed_config(config, training)
        training = training.model_copy(update={"deepspeed": str(config.resolve())})
    model = _resolve_model_ref(recipe.model, base, "model")
    objective = recipe.objective
    if getattr(objective, "reward_model", None) is not None:
        scorer = (base / objective.reward_model).expanduser()
        if not scorer.is_dir():
            raise LLMTuneError(
                f"{scorer}: objective.reward_model directory not found (a reward-model run directory or a "
                "sequence-classification checkpoint; paths are relative to the recipe file)"
            )
        objective = objective.model_copy(update={"reward_model": str(scorer.resolve())})
    if objective.name == "distill":
        teacher = _resolve_model_ref(objective.teacher, base, "objective.teacher")
        objective = objective.model_copy(update={"teacher": teacher})
    return recipe.model_copy(
        update={"data": data.model_copy(update=updates), "model": model, "training": training, "objective": objective}
    )


def _resolve_data_ref(ref: str, base: Path, key: str) -> str:
    """A data file or directory relative to the recipe file becomes absolute; a hub name stays as written."""
    local = base / ref
    if local.exists():
        return str(local.resolve())
    if is_local_data_ref(ref):
        raise LLMTuneError(f"{local}: {key} file not found (paths are relative to the recipe file)")
    return ref


def _resolve_model_ref(ref: str, base: Path, key: str) -> str:
    """A model directory or GGUF file relative to the recipe file becomes absolute; other references stay as
    written. A GGUF file must exist."""
    if ref.startswith(("builtin:", "tiny:")):
        return ref
    local = base / Path(ref).expanduser()
    if is_gguf_ref(ref):
        if not local.is_file():
            raise LLMTuneError(f"{local}: {key} GGUF file not found (paths are relative to the recipe file)")
        return str(local.resolve())
    if local.is_dir():
        return str(local.resolve())
    return ref


# Names users bring from peft, transformers and other toolkits, so a typo of those finds our key too.
_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "sequence_len": "max_length",
    "output_dir": "dir",
}


# Speed levers that recipes written for earlier releases set under training or data.
_MOVED = {
    **{key: f"speed.{key}" for key in SpeedSpec.model_fields},
    "fused_blocks": "speed.fused_kernels",
    "cpu_float32_attention": "speed.float32_attention",
}


def _describe(err: dict[str, Any]) -> str:
    loc, names = _walk(err["loc"])
    where = ".".join(loc) or "(top level)"
    kind = err["type"]
    if kind == "extra_forbidden":
        bad = loc[-1]
        if len(loc) == 2 and loc[0] != "speed" and bad in _MOVED:
            return f"{where}: unknown key; speed levers have their own section: set {_MOVED[bad]}"
        if bad == "full_precision_outputs":
            return f"{where}: unknown key; frozen layers always return full-precision outputs now: remove it"
        aliases = {alias: key for alias, key in _ALIASES.items() if key in names}
        close = difflib.get_close_matches(bad, [*names, *aliases], n=1, cutoff=0.5)
        hint = (
            f"did you mean '{aliases.get(close[0], close[0])}'?" if close else f"valid keys: {', '.join(sorted(names))}"
        )
        owners = _union_members_with(loc[:-1], bad)
        if owners:
            hint = f"'{bad}' is an option of {', '.join(owners)}, not of {'.'.join(loc[:-1])} {err['loc'][-2]!r}"
        return f"{where}: unknown key; {hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "union_tag_invalid":
        return f"{where}.name: unknown name {err['ctx']['tag']!r}; expected one of {err['ctx']['expected_tags']}"
    if kind == "union_tag_not_found":
        return f"{where}: needs a 'name' key, e.g. {{name: ...}}"
    if kind == "value_error":
        message = err["msg"].removeprefix("Value error, ")
        return f"{where}: {message}" if loc else message
    return f"{where}: {err['msg']} (got {_short(err.get('input'))})"


def _union_members_with(path: list[str], key: str) -> list[str]:
    """Names of the kinds chosen at `path` (methods, objectives, optimizers, ...) that do accept `key`, for a key
    given to the wrong kind."""
    models: list[type[BaseModel]] = [Recipe]
    for part in path:
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        models = models_in(field.annotation) if field is not None else []
    if len(models) < 2:
        return []
    return [spec_name(m) for m in models if key in m.model_fields]


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """Turn a pydantic error location into the key path the user wrote and the valid keys at its end."""
    shown: list[str] = []
    models: list[type[BaseModel]] = [Recipe]
    names: list[str] = list(Recipe.model_fields)
    for part in loc:
        if isinstance(part, int) and shown:
            shown[-1] += f"[{part}]"  # an item of a list, as data.train[1]
            continue
        part = str(part)
        by_tag = {spec_name(m): m for m in models if "name" in m.model_fields}
        if part in by_tag and not any(part in m.model_fields for m in models):
            models = [by_tag[part]]
            names = list(models[0].model_fields)
            continue
        if "[" in part or part in ("str", "int", "float", "bool"):
            continue  # pydantic names the union member it tried; the user wrote no such key
        shown.append(part)
        field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
        models = models_in(field.annotation) if field is not None else []
        names = sorted({n for m in models for n in m.model_fields}) if models else names
    if len(models) == 1:
        names = list(models[0].model_fields)
    return shown, names


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
