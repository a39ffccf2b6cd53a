from pathlib import Path
from typing import Annotated

import typer

from llmtune.cli.options import Overrides


def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML to check.")],
    overrides: Overrides = None,
) -> None:
    """Check a recipe, its data files and columns, without loading a model.

    Example: llmtune validate recipes/quickstart.yaml
    """
    from llmtune.data import split_samples
    from llmtune.recipe import load_recipe

    loaded = load_recipe(recipe, overrides or [])
    train, held_out = split_samples(loaded)
    typer.echo(
        f"ok: {recipe}: model {loaded.model}, method {loaded.method.name}, objective {loaded.objective.name}, "
        f"{len(train)} train rows, {len(held_out)} held-out rows ({loaded.data.format})"
    )
