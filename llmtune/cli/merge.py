from pathlib import Path
from typing import Annotated

import typer

from llmtune.cli.options import Overwrite


def merge_adapter(
    run_dir: Annotated[Path, typer.Argument(help="A completed run directory with an adapter.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the standalone merged model.")],
    tolerance: Annotated[
        float, typer.Option(help="Largest allowed |logit| difference between merged and base+adapter.")
    ] = 1e-3,
    overwrite: Overwrite = False,
) -> None:
    """Merge a run's adapter into its base and save a model that loads without peft.

    Example: llmtune merge-adapter runs/quickstart --out merged/quickstart
    """
    from llmtune.merge import merge_adapter as run_merge

    result = run_merge(run_dir, out, tolerance=tolerance, overwrite=overwrite)
    typer.echo(
        f"merged into {result.out}; max |logit diff| merged vs base+adapter {result.max_abs_diff:.2e}, "
        f"after reload {result.reload_max_abs_diff:.2e} (tolerance {tolerance:g}); "
        f"differs from base by {result.base_max_abs_diff:.3g}"
    )
