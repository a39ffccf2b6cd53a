"""Options shared by several commands, written once so their help text stays in step."""

from typing import Annotated

import typer

Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override a recipe key, e.g. --set training.max_steps=5."),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output directory if it is not empty.")]
