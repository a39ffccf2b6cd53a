from pathlib import Path
from typing import Annotated

import typer

from llmtune.cli.options import Overrides


def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory (tuned model) or a recipe (its base model).")],
    compare_base: Annotated[
        bool, typer.Option("--compare-base", help="Also evaluate the untuned base model and show the difference.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Results JSON; default RUN_DIR/eval.json for a run directory.")
    ] = None,
    prompting: Annotated[
        str | None,
        typer.Option(
            "--prompting",
            metavar="MODES",
            help="Also score the base model prompted: zero-shot, few-shot:K (K training examples in front), or both "
            "comma-separated; replaces eval.prompting.",
        ),
    ] = None,
    overrides: Overrides = None,
    harness: Annotated[
        str | None,
        typer.Option(
            "--harness",
            help="lm-evaluation-harness tasks, comma-separated (e.g. hellaswag,arc_easy), instead of the held-out "
            "data; results in RUN_DIR/harness.json (or --out).",
        ),
    ] = None,
    harness_include: Annotated[
        Path | None,
        typer.Option("--harness-include", help="A directory of lm-eval task YAML files (local tasks run offline)."),
    ] = None,
    harness_limit: Annotated[
        int | None, typer.Option("--harness-limit", min=1, help="Score at most N examples of each harness task.")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", min=0, help="Few-shot examples per harness question.")
    ] = None,
    harness_chat: Annotated[
        bool,
        typer.Option("--harness-chat", help="Put harness prompts through the chat template (default: plain text)."),
    ] = False,
) -> None:
    """Score a model on held-out data: perplexity, BLEU, ROUGE, exact match (classifiers: accuracy, macro-F1;
    taggers: word accuracy, precision, recall, F1).

    Example: llmtune eval runs/quickstart --compare-base
    """
    if harness is not None:
        from llmtune.harness import evaluate_harness

        found = evaluate_harness(
            target, harness, compare_base, harness_include, harness_limit, num_fewshot, harness_chat, out, overrides
        )
        typer.echo(format_table(found.results))
        typer.echo("\n".join(found.summary()))
        return
    from llmtune.evaluation import evaluate as run_eval

    modes = None if prompting is None else [m.strip() for m in prompting.split(",") if m.strip()]
    report = run_eval(target, compare_base=compare_base, out=out, overrides=overrides or [], prompting=modes)
    typer.echo(format_table(report.results))
    for note in report.notes:
        typer.echo(f"note: {note}")
    typer.echo(f"{report.examples} held-out examples" + (f"; results in {report.out}" if report.out else ""))


def format_table(results: dict[str, dict[str, float]]) -> str:
    from llmtune.report import result_columns

    columns = result_columns(results)
    if "base" in results and "tuned" in results:
        columns.insert(columns.index("tuned") + 1, "delta")
    metrics = list(dict.fromkeys(k for r in results.values() for k in r))
    width = max(12, *(len(name) + 1 for name in metrics))
    lines = [f"{'metric':<{width}}" + "".join(f"{c:>12}" for c in columns)]
    for name in metrics:
        cells = [results[c].get(name) if c != "delta" else None for c in columns]
        if "delta" in columns:
            before, after = results["base"].get(name), results["tuned"].get(name)
            cells[columns.index("delta")] = after - before if None not in (before, after) else None
        lines.append(f"{name:<{width}}" + "".join(f"{v:>12.4f}" if v is not None else f"{'-':>12}" for v in cells))
    return "\n".join(lines)
