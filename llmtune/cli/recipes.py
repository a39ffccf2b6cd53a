"""`llmtune recipes list|show|copy|schema` and `llmtune init`: find a recipe to start from, or write a new one.

The recipes are the repository's `recipes/` directory, or the directory the LLMTUNE_RECIPES variable names.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

import llmtune
from llmtune.errors import LLMTuneError, first_line

RECIPES_ENV = "LLMTUNE_RECIPES"
DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
# Usual first learning rates. Methods that train a few new parameters from scratch (soft prompts, IA3 scales)
# need large steps; methods that move pretrained weights need small ones. The rest use the schema's default.
LEARNING_RATES = {
    "full": 2e-5,
    "layers": 1e-4,
    "head": 1e-4,
    "bitfit": 1e-3,
    "p-tuning": 1e-3,
    "ia3": 1e-2,
    "prefix": 1e-2,
    "prompt": 3e-2,
}
_LORA_OPTIONS = {
    "r": "rank of the update: higher learns more, costs memory",
    "alpha": "the update is scaled by alpha / r",
    "dropout": "on the adapter's input: regularises small data",
    "target_modules": "all-linear: every linear layer but the head",
}
# The options a user of each method tunes first, with why; `init` writes these and leaves the rest to defaults.
MAIN_OPTIONS = {
    "lora": _LORA_OPTIONS,
    "dora": _LORA_OPTIONS,
    "qlora": {**_LORA_OPTIONS, "bits": "bits per frozen base weight", "compute_dtype": "bfloat16 on GPUs that have it"},
    "prefix": {"num_virtual_tokens": "trained key/value positions per layer"},
    "prompt": {"num_virtual_tokens": "soft-prompt vectors before the input"},
    "p-tuning": {"num_virtual_tokens": "virtual tokens the encoder produces"},
    "adapter": {
        "placement": "pfeiffer: after each feed-forward; houlsby: also after attention",
        "reduction_factor": "hidden size / this = bottleneck width",
    },
    "head": {"tied": "a head shared with the embeddings: train a copy, or both"},
    "layers": {"last_k": "train the last K blocks"},
}

app = typer.Typer(
    name="recipes",
    help="List, show and copy the shipped recipes; print the recipe JSON schema.\n\n"
    "Example: llmtune recipes copy quickstart my_recipe.yaml",
    no_args_is_help=True,
)

OverwriteFile = Annotated[bool, typer.Option("--overwrite", help="Replace the output file if it exists.")]


def recipes_dir() -> Path:
    override = os.environ.get(RECIPES_ENV)
    if override:
        return Path(override).expanduser()
    return Path(llmtune.__file__).resolve().parents[1] / "recipes"


def recipe_files() -> dict[str, Path]:
    directory = recipes_dir()
    if not directory.is_dir():
        raise LLMTuneError(f"{directory}: recipes directory not found; set {RECIPES_ENV} to a directory of recipes")
    # Sorted by name, not file name: qlora before qlora-paged-adamw ("." sorts after "-").
    files = [p for p in directory.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()]
    return {p.stem: p for p in sorted(files, key=lambda p: p.stem)}


def find_recipe(name: str) -> Path:
    files = recipe_files()
    path = files.get(Path(name).stem if name.endswith((".yaml", ".yml")) else name)
    if path is None:
        raise LLMTuneError(f"recipe {name!r} not found in {recipes_dir()}; available: {', '.join(files)}")
    return path


def description(text: str) -> str:
    """The first sentence of a recipe's opening comment, joined across the lines it wraps over."""
    lines = []
    for line in text.splitlines():
        if line.startswith("# yaml-language-server:"):
            continue  # the editor's schema line that `llmtune recipes schema` suggests
        if not line.startswith("#") or not line.strip("# "):
            break
        lines.append(line.lstrip("#").strip())
    paragraph = " ".join(lines)
    sentence = re.match(r"(.+?\.)(\s|$)", paragraph)
    return sentence.group(1) if sentence else paragraph


@app.command("list")
def list_recipes() -> None:
    """List the recipes: name, method, objective, model and what each one does.

    Example: llmtune recipes list
    """
    import yaml

    from llmtune.recipe import validate_recipe_dict

    table = [("NAME", "METHOD", "OBJECTIVE", "MODEL", "DESCRIPTION")]
    for name, path in recipe_files().items():
        text = path.read_text(encoding="utf-8")
        try:
            recipe = validate_recipe_dict(yaml.safe_load(text), source=path.name)
        except (yaml.YAMLError, LLMTuneError) as e:
            # One broken recipe should not hide the others.
            table.append((name, "?", "?", "?", f"invalid: {first_line(e)}"))
            continue
        table.append((name, recipe.method.name, recipe.objective.name, recipe.model, description(text)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        typer.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[4]]).rstrip())


@app.command("show")
def show(name: Annotated[str, typer.Argument(help="Recipe name, as `llmtune recipes list` shows it.")]) -> None:
    """Print a recipe's YAML, comments included.

    Example: llmtune recipes show quickstart
    """
    typer.echo(find_recipe(name).read_text(encoding="utf-8"), nl=False)


@app.command("copy")
def copy(
    name: Annotated[str, typer.Argument(help="Recipe name, as `llmtune recipes list` shows it.")],
    dest: Annotated[Path, typer.Argument(help="File to write, or a directory to write NAME.yaml into.")],
    overwrite: OverwriteFile = False,
) -> None:
    """Copy a recipe to edit it; data paths relative to the recipe are rewritten so the copy finds the same data.

    Example: llmtune recipes copy quickstart my_recipe.yaml
    """
    from llmtune.artifacts import write_text

    source = find_recipe(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.suffix not in (".yaml", ".yml"):
        # Most likely a directory that does not exist yet; a recipe without the suffix would be missed by tools.
        raise LLMTuneError(f"{dest}: give a .yaml file name or an existing directory")
    if target.exists() and not overwrite:
        raise LLMTuneError(f"{target}: already exists; pass --overwrite to replace it")
    text, rewritten = rebase_paths(source.read_text(encoding="utf-8"), source.parent, target.parent, source)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_text(target, text)
    note = f"; rewrote {', '.join(rewritten)} to point at the recipe's data" if rewritten else ""
    typer.echo(f"copied {source} to {target}{note}")


def rebase_paths(text: str, source_dir: Path, dest_dir: Path, source: Path) -> tuple[str, list[str]]:
    """Rewrite the local paths a recipe gives relative to its own directory so they hold from `dest_dir`.

    The YAML is edited as text, not loaded and dumped again, so its comments survive. Returns the new
    text and the key paths that changed.
    """
    import yaml

    raw = yaml.safe_load(text)
    raw = raw if isinstance(raw, dict) else {}
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    # The same references load_recipe resolves against the recipe's directory, each source of a mixture too.
    refs: dict[tuple[str | int, ...], Any] = {("model",): raw.get("model")}
    for field in ("train", "eval"):
        value = data.get(field)
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            keys = ("data", field) if i is None else ("data", field, i)
            if isinstance(item, dict):
                keys, item = (*keys, "path"), item.get("path")
            refs[keys] = item
    rewritten = []
    for keys, ref in refs.items():
        if not isinstance(ref, str) or Path(ref).is_absolute() or not (source_dir / ref).exists():
            continue
        new = recipe_path(source_dir / ref, dest_dir)
        if new != ref:
            text = _replace_value(text, keys, ref, new, source)
            rewritten.append(_key_name(keys))
    return text, rewritten


def _key_name(keys: tuple[str | int, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


def recipe_path(path: Path, recipe_dir: Path) -> str:
    """How a recipe in `recipe_dir` should name `path`: relative when the two share a directory below the
    filesystem root, so they can move together; absolute otherwise, rather than climbing ../../ to the root."""
    path, recipe_dir = path.resolve(), recipe_dir.resolve()
    common = Path(os.path.commonpath([path, recipe_dir]))
    if common == Path(common.anchor):
        return str(path)
    return os.path.relpath(path, recipe_dir)


def _replace_value(text: str, keys: tuple[str | int, ...], old: str, new: str, source: Path) -> str:
    import yaml

    # A mapping's value follows its key; a list item follows its dash (block style) or a bracket or comma (flow).
    before = (
        rf"(?<![\w-])({re.escape(keys[-1])}:[ \t]*)" if isinstance(keys[-1], str) else r"((?:^[ \t]*-|[\[,])[ \t]*)"
    )
    pattern = re.compile(
        rf"{before}(['\"]?){re.escape(old)}\2(?=[ \t]*([,}}\]#]|$))(?P<comment>[ \t]*#.*)?",
        re.M,
    )
    for match in pattern.finditer(text):
        quote = match.group(2)
        # The author's comment on the line described the old path; say where it came from instead.
        comment = f"  # was {old}, relative to {source.resolve().parent}" if match.group("comment") else ""
        # Keep the author's quoting; a path that plain YAML would misread gets double quotes.
        for value in (f"{quote}{new}{quote}", json.dumps(new)):
            candidate = text[: match.start()] + match.group(1) + value + comment + text[match.end() :]
            parsed: Any = yaml.safe_load(candidate)
            for key in keys:
                if isinstance(key, int):
                    parsed = parsed[key] if isinstance(parsed, list) and key < len(parsed) else None
                else:
                    parsed = parsed.get(key) if isinstance(parsed, dict) else None
            if parsed == new:
                return candidate
    raise LLMTuneError(
        f"{source}: cannot rewrite {_key_name(keys)} in the copy; copy the file by hand and set it to {new}"
    )


@app.command("schema")
def schema(
    out: Annotated[Path | None, typer.Option("--out", help="Write the schema to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON schema of recipes, so editors can validate and complete recipe YAML.

    With the YAML language server (VS Code, Neovim, ...), a recipe whose first line is
    `# yaml-language-server: $schema=recipe.schema.json` is checked as you type.

    Example: llmtune recipes schema --out recipe.schema.json
    """
    from llmtune.artifacts import write_text
    from llmtune.recipe import Recipe

    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", **Recipe.model_json_schema()}
    text = json.dumps(document, indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_text(out, text)
        typer.echo(f"wrote {out}")


def init(
    model: Annotated[
        str | None,
        typer.Option(help=f"Base model: hub id, local dir, builtin:NAME or tiny:ARCH. Default: {DEFAULT_MODEL}."),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="Tuning method, e.g. lora, qlora, dora, ia3, prompt, full. Default: lora.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="Training data: a .jsonl/.json/.csv/.parquet file, a save_to_disk directory or a hub name."),
    ] = None,
    data_format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="Data format: chat, instruction, prompt_completion or text. Default: guessed from the columns.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Recipe file to write. Default: recipe.yaml.")] = None,
    overwrite: OverwriteFile = False,
) -> None:
    """Write a new recipe for a model, a tuning method and a data file; in a terminal, asks for what is missing.

    Only the keys a new recipe is likely to change are written, each with what it is for; the rest keep their
    defaults.

    Example: llmtune init --model builtin:smollm2-135m-instruct --method lora --data train.jsonl --out my.yaml
    """
    from llmtune.artifacts import write_text
    from llmtune.data import FORMAT_COLUMNS, check_columns, load_rows
    from llmtune.methods import METHODS
    from llmtune.recipe import DataSpec, is_local_data_ref

    ask = _interactive()

    def check_method(name: str) -> str:
        if name not in METHODS:
            raise LLMTuneError(f"method {name!r}: unknown; choose one of {', '.join(METHODS)}")
        return name

    def check_data(ref: str) -> tuple[str, Any]:
        path = Path(ref).expanduser()
        if path.exists():
            return str(path), load_rows(str(path))
        if is_local_data_ref(ref):
            raise LLMTuneError(f"{ref}: data file not found")
        return ref, None  # a hub dataset name, fetched when training starts

    model = _resolve("model", model, "Base model", DEFAULT_MODEL, ask, str)
    method = _resolve("method", method, f"Method ({', '.join(METHODS)})", "lora", ask, check_method)
    data, rows = _resolve("data", data, "Training data (file, directory or hub dataset)", None, ask, check_data)

    def check_format(name: str) -> str:
        if name not in FORMAT_COLUMNS:
            raise LLMTuneError(f"format {name!r}: unknown; choose one of {', '.join(FORMAT_COLUMNS)}")
        if rows is not None:
            check_columns(rows, DataSpec(train=data, format=name), data)
        return name

    guessed = _guess_format(rows) if rows else None
    data_format = _resolve(
        "format", data_format, f"Data format ({', '.join(FORMAT_COLUMNS)})", guessed or "chat", ask, check_format
    )

    def check_out(value: str) -> Path:
        path = Path(value).expanduser()
        if path.exists() and not overwrite:
            raise LLMTuneError(f"{path}: already exists; pass --overwrite to replace it")
        return path

    out = _resolve("out", str(out) if out else None, "Write the recipe to", "recipe.yaml", ask, check_out)

    reference = recipe_path(Path(data), out.parent) if Path(data).exists() else data
    text = render_recipe(model, method, reference, data_format, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, text)
    typer.echo(f"wrote {out}: {method} on {model}, data {data} ({data_format})")
    typer.echo(f"next: llmtune data preview {out}")


def _interactive() -> bool:
    return sys.stdin.isatty()


T = TypeVar("T")


def _resolve(
    flag: str, given: str | None, question: str, default: str | None, ask: bool, check: Callable[[str], T]
) -> T:
    """The option's value if given; else, in a terminal, a prompt's answer (asked until valid); else the default."""
    if given is not None:
        return check(given)
    if not ask:
        if default is None:
            raise LLMTuneError(f"--{flag} is required (or run llmtune init in a terminal to be asked)")
        return check(default)
    while True:
        try:
            return check(typer.prompt(question, default=default))
        except LLMTuneError as e:
            typer.echo(f"  {e}", err=True)


def _guess_format(rows: Any) -> str | None:
    from llmtune.data import FORMAT_COLUMNS, OPTIONAL_COLUMNS

    present = set(rows[0])
    for name, columns in FORMAT_COLUMNS.items():
        if all(c in present or c in OPTIONAL_COLUMNS for c in columns):
            return name
    return None


def render_recipe(model: str, method: str, data: str, data_format: str, out: Path) -> str:
    """The keys a new recipe is likely to change, each with a comment on what it is for; the rest keep their
    defaults, which the recipe reference lists."""
    from llmtune.recipe import validate_recipe_dict

    run_dir = f"runs/{out.stem}"
    learning_rate = LEARNING_RATES.get(method)
    raw = {
        "model": model,
        "method": {"name": method},
        "objective": {"name": "sft"},
        "data": {"train": data, "format": data_format},
        "training": {"epochs": 1, **({"learning_rate": learning_rate} if learning_rate else {})},
        "output": {"dir": run_dir},
    }
    # Validated first, so every value written is the one the schema resolves and the file loads as written.
    dumped = validate_recipe_dict(raw, source="llmtune init").model_dump(mode="json")
    # normpath: the recipe's directory may not exist yet, and ../ through a missing directory finds nothing.
    relative = not Path(data).is_absolute() and Path(os.path.normpath(out.parent / data)).exists()
    sections = {
        "method": {
            "name": "`llmtune recipes list` has a worked example of each method",
            **MAIN_OPTIONS.get(method, {}),
        },
        "objective": {"name": "next-token loss on the responses; docs/objectives.md lists the others"},
        "data": {
            "train": "relative to this file" if relative else "a file, a save_to_disk directory or a hub dataset name",
            "format": "which columns hold the prompt and the response",
            "max_length": "tokens per row",
        },
        "training": {
            "epochs": "passes over the data; or max_steps: N optimizer steps",
            "batch_size": "rows per step; lower it if memory runs out",
            "grad_accum": "micro-batches per step: a larger batch without its memory",
            "learning_rate": f"a usual start for {method}",
            "seed": "the same seed gives the same run",
        },
        "output": {"dir": "where weights, logs and checkpoints go, relative to where you run llmtune"},
    }
    header = [
        f"{method} fine-tuning of {model} on {data} ({data_format} format). Written by `llmtune init`.",
        "",
        f"  llmtune data preview {out}",
        f"  llmtune finetune {out}",
        f"  llmtune eval {run_dir} --compare-base",
        "",
        "Every other key keeps its default; the recipe reference (docs/, `mkdocs serve`) and",
        "`llmtune recipes schema` list them all.",
    ]
    lines = [f"# {line}".rstrip() for line in header] + [
        "",
        _key_line("model", model, "hub id, local dir, builtin:NAME or tiny:ARCH"),
    ]
    for section, notes in sections.items():
        lines.append(f"{section}:")
        lines += [_key_line(f"  {key}", dumped[section][key], note) for key, note in notes.items()]
        if section == "data":
            # Commented out: a held-out file is worth naming, but init cannot guess it.
            held_out = f"held-out rows; without it {dumped['data']['eval_split']:.0%} of train is held out"
            lines.append(f"{'  # eval: held_out.jsonl':<32} # {held_out}")
    return "\n".join(lines) + "\n"


def _key_line(key: str, value: Any, note: str) -> str:
    import yaml

    # A scalar dumps as a one-value document ending in '...'; the flow style keeps lists on one line.
    dumped = yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()
    return f"{f'{key}: {dumped}':<32} # {note}"
