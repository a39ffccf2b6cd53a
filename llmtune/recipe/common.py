"""What every recipe section shares: unknown keys are errors, and the auto-or-bool type of the speed levers."""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, TypeAdapter, ValidationError


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _auto_or_bool(value: Any) -> Any:
    # Left to the union, pydantic reports only its first member: "Input should be 'auto'".
    if value == "auto":
        return value
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        raise ValueError(f"expected auto, true or false (got {value!r})") from None


AutoOrBool = Annotated[Union[Literal["auto"], bool], BeforeValidator(_auto_or_bool)]


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The spec classes an annotation admits: itself, every member of a (discriminated) union, or a list's items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return models_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in models_in(arg)]
    if origin is list:
        return models_in(typing.get_args(annotation)[0])
    return []


def spec_name(spec: type[BaseModel]) -> str:
    """The recipe name of a method or objective spec class (its `name: Literal[...]`)."""
    return spec.model_fields["name"].annotation.__args__[0]
