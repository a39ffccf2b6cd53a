"""MkDocs hook: the recipe reference, written from the schema at build time, and the pages kept elsewhere.

The reference walks `llmtune.recipe.Recipe` with pydantic's public API only (`model_fields`, the field
annotations), so a key added, moved or renamed in the schema shows up in the docs without an edit here.
Benchmark results live in benchmarks/RESULTS.md and the compatibility matrix in README.md (tests keep it
there), so the site reads both from where they are instead of keeping copies that drift.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = "reference.md"
RESULTS = "results.md"
MATRIX_MARK = "<!-- compat-matrix -->"
TEMPLATES_MARK = "<!-- chat-templates -->"
MATRIX_START, MATRIX_END = "<!-- compat-matrix:start -->", "<!-- compat-matrix:end -->"


def on_files(files, config):
    # mkdocs runs from anywhere; the package under documentation is the checkout the docs sit in.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from llmtune.recipe import Recipe

    files.append(File.generated(config, REFERENCE, content=render_reference(Recipe)))
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")
    files.append(File.generated(config, RESULTS, content=results))
    return files


def on_page_markdown(markdown, page, config, files):
    if TEMPLATES_MARK in markdown:
        markdown = markdown.replace(TEMPLATES_MARK, render_templates())
    if MATRIX_MARK not in markdown:
        return markdown
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    matrix = readme.split(MATRIX_START, 1)[1].split(MATRIX_END, 1)[0].strip("\n")
    return markdown.replace(MATRIX_MARK, matrix)


def render_templates() -> str:
    """The chat-template registry as a table, from llmtune.templates.TEMPLATES itself."""
    from llmtune.templates import TEMPLATES

    lines = ["| name | used by | tokens added when missing | notes |", "|---|---|---|---|"]
    for t in TEMPLATES.values():
        tokens = ", ".join(f"`{token}`" for token in t.tokens) or "none (plain text)"
        lines.append(f"| `{t.name}` | {t.used_by} | {tokens} | {t.note} |")
    return "\n".join(lines)


def render_reference(recipe: type) -> str:
    lines = [
        "# Recipe reference",
        "",
        "Every key a recipe takes, generated from the schema when these docs were built: the dotted path you",
        "would pass to `--set`, its type, its default and what it is for. `llmtune recipes schema` prints the",
        "same schema as JSON for editors. Unknown keys are refused with the closest valid one.",
        "",
    ]
    top = [(name, field) for name, field in recipe.model_fields.items() if not _models_in(field.annotation)]
    lines += ["## Top level", "", *_table("", top)]
    for name, field in recipe.model_fields.items():
        members = _models_in(field.annotation)
        if members:
            lines += _section(name, field, members, level=2)
    return "\n".join(lines) + "\n"


def _section(path: str, field: Any, members: list[type], level: int) -> list[str]:
    heading = "#" * level
    lines = [f"{heading} {path}", ""]
    if field.description:
        lines += [_cell(field.description), ""]
    tagged = {_tag(m): m for m in members if _tag(m) is not None}
    if len(members) > 1 and len(tagged) == len(members):
        names = ", ".join(f"`{tag}`" for tag in tagged)
        default = " Required." if field.is_required() else f" Default: `{_default(field)}`."
        lines += [f"`{path}.name` picks one of {names}; each takes its own keys.{default}", ""]
        for tag, member in tagged.items():
            lines += [f"{heading}# {path}: {tag}", ""]
            if member.__doc__:
                lines += [_cell(member.__doc__), ""]
            options = [(n, f) for n, f in member.model_fields.items() if n != "name"]
            lines += _nested(path, options, level + 1) if options else ["No options.", ""]
        return lines
    (member,) = members
    return lines + _nested(path, list(member.model_fields.items()), level)


def _nested(path: str, fields: list[tuple[str, Any]], level: int) -> list[str]:
    plain = [(n, f) for n, f in fields if not _models_in(f.annotation)]
    lines = _table(f"{path}.", plain) if plain else []
    for name, field in fields:
        members = _models_in(field.annotation)
        if members:
            lines += _section(f"{path}.{name}", field, members, level + 1)
    return lines


def _table(prefix: str, fields: list[tuple[str, Any]]) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in fields:
        default = "required" if field.is_required() else f"`{_cell(_default(field))}`"
        rows.append(
            f"| `{prefix}{name}` | {_cell(_type(field.annotation))} | {default} | {_cell(field.description or '')} |"
        )
    return [*rows, ""]


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True, validated_data={})
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json", exclude_defaults=True)
    # The flow style keeps lists and mappings on one line; a scalar's document end marker is noise here.
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return ", ".join(f"`{a}`" if not isinstance(a, bool) else f"`{str(a).lower()}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))} of {', '.join(_type(a) for a in args)}"
    if annotation is bool:
        return "`true`, `false`"
    return getattr(annotation, "__name__", str(annotation))


def _models_in(annotation: Any) -> list[type]:
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (Union, types.UnionType, typing.Annotated):
        args = typing.get_args(annotation)
        args = args[:1] if typing.get_origin(annotation) is typing.Annotated else args
        return [m for arg in args for m in _models_in(arg)]
    return []


def _tag(model: type) -> str | None:
    field = model.model_fields.get("name")
    if field is None or typing.get_origin(field.annotation) is not Literal:
        return None
    return typing.get_args(field.annotation)[0]


def _cell(text: str) -> str:
    # A bare pipe would end the table cell; newlines would end the row.
    return " ".join(text.split()).replace("|", "&#124;")
