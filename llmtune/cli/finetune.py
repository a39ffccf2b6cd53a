from pathlib import Path
from typing import Annotated

import typer

from llmtune.cli.options import Overrides, Overwrite


def finetune(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/quickstart.yaml.")],
    overrides: Overrides = None,
    overwrite: Overwrite = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in output.dir from its last complete checkpoint.")
    ] = False,
    resume_from: Annotated[
        Path | None, typer.Option("--resume-from", help="Continue from this checkpoint directory.")
    ] = None,
) -> None:
    """Fine-tune a model as a recipe says and write a run directory.

    Example: llmtune finetune recipes/quickstart.yaml --set training.max_steps=50
    """
    from llmtune.run import finetune as run_finetune

    result = run_finetune(recipe, overrides or [], overwrite, resume=resume_from or resume)
    m = result.metrics
    summary = f"train_loss {m['train_loss']:.4f}"
    if "eval_loss" in m:
        summary += f", eval_loss {m['eval_loss']:.4f}"
    typer.echo(f"done: {m['steps']} steps in {m['train_seconds']:.0f}s, {summary}; run directory {result.run.path}")
    typer.echo(f"next: llmtune eval {result.run.path} --compare-base")
