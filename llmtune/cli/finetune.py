import os
import subprocess
import sys
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
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Train with N processes (DDP) by relaunching under torchrun; same as "
            "`torchrun --nproc_per_node N -m llmtune finetune ...`.",
        ),
    ] = 1,
) -> None:
    """Fine-tune a model as a recipe says and write a run directory.

    Example: llmtune finetune recipes/quickstart.yaml --set training.max_steps=50
    """
    if nproc > 1 and "RANK" not in os.environ:
        raise typer.Exit(_relaunch_under_torchrun(nproc))

    from llmtune.run import finetune as run_finetune
    from llmtune.run import is_main_process

    result = run_finetune(recipe, overrides or [], overwrite, resume=resume_from or resume)
    if not is_main_process():
        return
    m = result.metrics
    summary = f"train_loss {m['train_loss']:.4f}"
    if "eval_loss" in m:
        summary += f", eval_loss {m['eval_loss']:.4f}"
    typer.echo(f"done: {m['steps']} steps in {m['train_seconds']:.0f}s, {summary}; run directory {result.run.path}")
    typer.echo(f"next: llmtune eval {result.run.path} --compare-base")


def _relaunch_under_torchrun(nproc: int) -> int:
    """Run this same command line as N processes under torchrun, the launcher DDP expects."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--nproc":
            del args[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del args[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "llmtune", *args]
    return subprocess.call(command)
