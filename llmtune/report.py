"""Human-readable results of a run: report.md with a plot of its curves and metrics, and a model card.

Written at the end of `finetune` and again after `eval`, from the run directory's own files, so the
report always matches what is on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmtune import artifacts
from llmtune.artifacts import RunDir
from llmtune.recipe import Recipe, dump_recipe
from llmtune.recipe.models import is_gguf_ref
from llmtune.recipe.training import check_repo_id, is_prompting_column

REPORT_FILE = "report.md"
PLOT_FILE = "report.png"
MODEL_CARD_FILE = "README.md"


def write_run_report(run: RunDir) -> None:
    recipe = run.recipe()
    log = _read_jsonl(run.file(artifacts.TRAINER_LOG_FILE))
    metrics = read_json(run.file(artifacts.METRICS_FILE))
    evaluation = read_json(run.file(artifacts.EVAL_FILE))
    _plot(log, evaluation, run.file(PLOT_FILE))
    artifacts.write_text(run.file(REPORT_FILE), _report_markdown(recipe, metrics, evaluation, log))
    artifacts.write_text(run.file(MODEL_CARD_FILE), model_card(recipe, metrics, evaluation, merged=False))


def model_card(recipe: Recipe, metrics: dict[str, Any], evaluation: dict[str, Any], merged: bool) -> str:
    """A Hugging Face style model card: what the model is, how it was made, how well it does."""
    kind = "standalone model (adapter merged into the base weights)" if merged else _saved_as(recipe)
    trained = ""
    if metrics:
        p = metrics["parameters"]
        trained = (
            f"Trained {p['trainable']:,} of {p['total']:,} parameters for {metrics['steps']} steps; "
            f"final training loss {metrics['train_loss']:.4f}."
        )
    lines = [
        "---",
        *([f"base_model: {recipe.model}"] if _is_hub_id(recipe.model) else []),
        "library_name: transformers" if merged else "library_name: peft",
        "tags: [llmtune, " + recipe.method.name + ", " + recipe.objective.name + "]",
        "---",
        "",
        f"# {Path(recipe.output.dir or 'model').name}",
        "",
        f"Fine-tuned from `{recipe.model}` with **{recipe.method.name}** ({recipe.objective.name}) by llmtune; "
        f"this directory holds the {kind}. {trained}",
        "",
        "## Training data",
        "",
        *_data_lines(recipe),
        "",
        "## Results on the held-out data",
        "",
        _metrics_table(evaluation) if evaluation else "Not evaluated yet: run `llmtune eval RUN_DIR --compare-base`.",
        "",
        "## Intended use",
        "",
        "The task the training data describes, with the same prompt format (the saved tokenizer carries the "
        "chat template used in training). It inherits the base model's limitations and biases; check outputs "
        "before relying on them.",
        "",
        "## Recipe",
        "",
        "```yaml",
        dump_recipe(recipe).rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"


def _is_hub_id(ref: str) -> bool:
    """Whether a model reference names a Hub repository: the Hub refuses a card whose base_model is anything else
    (a local path, builtin:, tiny:), and would then refuse the whole upload."""
    if ref.startswith(("builtin:", "tiny:")) or is_gguf_ref(ref) or Path(ref).exists():
        return False
    try:
        check_repo_id(ref)
    except ValueError:
        return False
    return True


def _saved_as(recipe: Recipe) -> str:
    if recipe.method.name == "adapter":
        return "bottleneck adapter weights (`llmtune generate` / `llmtune eval` on the run directory insert them)"
    if recipe.method.saves_adapter:
        return "adapter (load it over the base model with peft, or run `llmtune merge-adapter`)"
    return "whole tuned model"


def _report_markdown(
    recipe: Recipe, metrics: dict[str, Any], evaluation: dict[str, Any], log: list[dict[str, Any]]
) -> str:
    losses = [e for e in log if "loss" in e]
    lines = [
        f"# Run report: {Path(recipe.output.dir or '').name}",
        "",
        f"- model: `{recipe.model}`, method: `{recipe.method.name}`, objective: `{recipe.objective.name}`",
    ]
    if metrics:
        p = metrics["parameters"]
        lines += [
            f"- trainable parameters: {p['trainable']:,} of {p['total']:,} ({100 * p['trainable'] / p['total']:.3f}%)",
            f"- steps: {metrics['steps']} in {metrics['train_seconds']:.0f} s; "
            f"final train loss {metrics['train_loss']:.4f}"
            + (f", eval loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""),
            f"- data: {json.dumps(metrics['data'])}",
        ]
    if losses:
        lines.append(
            f"- loss: {losses[0]['loss']:.4f} at step {losses[0]['step']} -> {losses[-1]['loss']:.4f} at "
            f"step {losses[-1]['step']}"
        )
    lines += ["", f"![curves and metrics]({PLOT_FILE})", "", "## Evaluation", ""]
    lines.append(_metrics_table(evaluation) if evaluation else "Not evaluated yet.")
    return "\n".join(lines) + "\n"


def result_columns(results: dict[str, Any]) -> list[str]:
    """The order results are shown in: prompting baselines, base, tuned, then further models (a distillation
    teacher), so the table reads from the least adapted model to the most."""
    prompted = [c for c in results if is_prompting_column(c)]
    main = [c for c in ("base", "tuned") if c in results]
    return prompted + main + [c for c in results if c not in prompted and c not in main]


def _metrics_table(evaluation: dict[str, Any]) -> str:
    columns = result_columns(evaluation)
    names = list(dict.fromkeys(k for c in columns for k in evaluation[c]))
    rows = ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        cells = [f"{evaluation[c][name]:.4f}" if name in evaluation[c] else "-" for c in columns]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _plot(log: list[dict[str, Any]], evaluation: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_eval) = plt.subplots(1, 3, figsize=(15, 4))
    train = [(e["step"], e["loss"]) for e in log if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log if "eval_loss" in e]
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train")
    if evals:
        ax_loss.plot(*zip(*evals, strict=True), "o", label="eval")
    ax_loss.set(title="loss", xlabel="step")
    ax_loss.legend()
    rates = [(e["step"], e["learning_rate"]) for e in log if "learning_rate" in e]
    if rates:
        ax_lr.plot(*zip(*rates, strict=True))
    ax_lr.set(title="learning rate", xlabel="step")
    scores = {k: v for k, v in evaluation.get("tuned", {}).items() if k not in ("perplexity", "loss")}
    if scores:
        names = list(scores)
        width = 0.4
        positions = range(len(names))
        if "base" in evaluation:
            ax_eval.bar(
                [p - width / 2 for p in positions], [evaluation["base"].get(n, 0) for n in names], width, label="base"
            )
        ax_eval.bar([p + width / 2 for p in positions], [scores[n] for n in names], width, label="tuned")
        ax_eval.set_xticks(list(positions), names, rotation=30)
        ax_eval.legend()
    ax_eval.set(title="held-out metrics (0-100)")
    fig.tight_layout()
    staging = path.with_name(f".{path.name}")
    fig.savefig(staging, format="png", dpi=80)
    plt.close(fig)
    staging.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _data_lines(recipe: Recipe) -> list[str]:
    """One line per source: its path and format, and its share of a mixture."""
    data = recipe.data

    def line(split: str, source: Any) -> str:
        share = f", weight {source.weight:g}" if source.weight is not None else ""
        if source.count is not None:
            share = f", {source.count} rows{' (repeats allowed)' if source.replace else ''}"
        return f"- {split}: `{source.path}` (format `{source.format}`{share})"

    lines = [line("train", source) for _, _, source in data.sources("train")]
    lines += [line("held out", source) for _, _, source in data.sources("eval")]
    if data.eval is None:
        lines.append(f"- held out: {data.eval_split:.0%} of each train source")
    return [*lines, f"- max_length {data.max_length}"]
