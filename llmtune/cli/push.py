from pathlib import Path
from typing import Annotated

import typer


def push(
    target: Annotated[Path, typer.Argument(help="A completed run directory, or a directory from merge-adapter.")],
    repo_id: Annotated[str, typer.Argument(help="Hub model repository as owner/name; created when missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository private.")] = False,
    merged: Annotated[
        bool,
        typer.Option("--merged", help="Merge the run's adapter into its base first and upload the standalone model."),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the files that would be uploaded, with sizes; no network.")
    ] = False,
) -> None:
    """Upload a run (adapter or model, tokenizer, model card, recipe, metrics) to the Hugging Face Hub.

    Example: llmtune push runs/quickstart your-name/quickstart-lora --private
    """
    from llmtune.push import push as run_push

    result = run_push(target, repo_id, private=private, merged=merged, dry_run=dry_run)
    total = sum(size for _, size in result.files)
    if result.url is None:
        typer.echo(f"would upload {len(result.files)} files ({_size(total)}) to {result.repo_id}:")
        width = max(len(f"{size:,}") for _, size in result.files)
        for name, size in result.files:
            typer.echo(f"  {size:>{width},} bytes  {name}")
    else:
        typer.echo(f"pushed {len(result.files)} files ({_size(total)}) to {result.repo_id}: {result.url}")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
