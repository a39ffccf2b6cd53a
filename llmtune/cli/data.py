"""`llmtune data preview`: look at training rows token by token before spending time on training."""

import sys
from pathlib import Path
from typing import Annotated

import typer

from llmtune.cli.options import Overrides

app = typer.Typer(
    name="data",
    help="Inspect training data as the model sees it.\n\nExample: llmtune data preview recipes/quickstart.yaml",
    no_args_is_help=True,
)

EOS_MARK = "⟨EOS⟩"


@app.command("preview")
def preview(
    target: Annotated[
        Path, typer.Argument(help="A recipe, or a run directory (its saved chat template is checked too).")
    ],
    n: Annotated[
        int, typer.Option("--n", "-n", min=1, help="How many training rows to show (of each source of a mixture).")
    ] = 3,
    overrides: Overrides = None,
) -> None:
    """Show training rows token by token: loss-bearing tokens highlighted, the rest dimmed, EOS marked.

    Ends with a summary (rows, tokens, truncated and dropped rows, share of tokens carrying loss, padding
    waste at the recipe's batch size). Fails when a row has every label masked, when EOS carries no loss,
    or when a run's saved chat template differs from the one training uses.

    Example: llmtune data preview recipes/quickstart.yaml --n 5
    """
    from llmtune.preview import preview_data

    result = preview_data(target, n, overrides or [])
    # Piped output loses colour, so loss-bearing spans are bracketed there instead.
    color = sys.stdout.isatty()
    legend = (
        f"{typer.style('green', fg='green', bold=True)}: carries loss; {typer.style('dim', dim=True)}: no loss"
        if color
        else "⟦bracketed⟧: carries loss; the rest: no loss"
    )
    typer.echo(f"{legend}; {EOS_MARK}: end of sequence")
    mixture = "sources" in result.counts
    row = dict.fromkeys(result.row_sources, 0)
    for source, tokens in zip(result.row_sources, result.rows, strict=True):
        row[source] += 1
        loss = sum(t.loss for t in tokens)
        where = f"{source}: row {row[source]}" if mixture else f"row {row[source]}"
        typer.echo(f"--- {where}: {len(tokens)} tokens, {loss} carry loss ---")
        typer.echo(_render(tokens, color))
    c = result.counts
    typer.echo(
        f"\n{c['rows']} training rows, {c['tokens']:,} tokens; over max_length={result.max_length}: "
        f"{c['truncated']} truncated, {c['dropped']} dropped\n"
        f"{c['loss_tokens']:,} tokens carry loss ({result.loss_fraction:.1%})\n"
        f"padding waste at batch_size={result.batch_size}: {result.padding_waste:.1%} "
        f"({result.pad_tokens:,} pad tokens)"
    )
    for key, s in c.get("sources", {}).items():
        typer.echo(
            f"  {key} ({s['path']}): {s['rows']} rows, {s['tokens']:,} tokens, {s['loss_tokens']:,} carry loss; "
            f"{s['truncated']} truncated, {s['dropped']} dropped"
        )


def _render(tokens, color: bool) -> str:
    """Join the tokens' texts, styling each run of tokens that do or do not carry loss."""
    spans: list[tuple[bool, str]] = []
    for t in tokens:
        text = t.text + (EOS_MARK if t.eos else "")
        if spans and spans[-1][0] == t.loss:
            spans[-1] = (t.loss, spans[-1][1] + text)
        else:
            spans.append((t.loss, text))
    if color:
        return "".join(typer.style(s, fg="green", bold=True) if loss else typer.style(s, dim=True) for loss, s in spans)
    return "".join(f"⟦{s}⟧" if loss else s for loss, s in spans)
