"""Every tuning method on the builtin model and the quickstart task, with the same number of steps.

Prints JSON (and writes it with --out) with, per method recipe: trainable and total parameters,
adapter or model size on disk, training time, and held-out metrics of tuned and base. With
--markdown it also prints the README table.

    python benchmarks/methods.py --steps 20 --examples 32 --out benchmarks/methods.json --markdown
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmtune.artifacts import ADAPTER_DIR, MODEL_DIR
from llmtune.evaluation import evaluate
from llmtune.run import finetune

REPO = Path(__file__).resolve().parents[1]
# Recipes on the builtin model, one per method (bitfit needs a hub model with biases and is left out).
RECIPES = [
    "quickstart",
    "rslora",
    "dora",
    "qlora",
    "ia3",
    "prefix",
    "prompt",
    "p-tuning",
    "adapter",
    "head",
    "layers",
    "full",
]


def run_one(name: str, steps: int, examples: int, workdir: Path) -> dict:
    out = workdir / name
    overrides = [f"training.max_steps={steps}", f"output.dir={out}", f"eval.max_examples={examples}"]
    started = time.time()
    result = finetune(REPO / "recipes" / f"{name}.yaml", overrides)
    train_seconds = time.time() - started
    report = evaluate(out, overrides=[f"eval.max_examples={examples}"])
    weights = out / ADAPTER_DIR if (out / ADAPTER_DIR).is_dir() else out / MODEL_DIR
    return {
        "recipe": f"recipes/{name}.yaml",
        "method": result.run.recipe().method.name,
        "parameters": result.metrics["parameters"],
        "weights_dir": weights.name,
        "size_on_disk_bytes": sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()),
        "train_seconds": round(train_seconds, 1),
        "steps": steps,
        "eval_examples": report.examples,
        "tuned": report.results["tuned"],
    }


def run_base(examples: int) -> dict:
    """The untuned builtin model on the same held-out rows: every recipe above starts from it."""
    report = evaluate(REPO / "recipes" / "quickstart.yaml", overrides=[f"eval.max_examples={examples}"])
    return {"recipe": "(base model, untuned)", "eval_examples": report.examples, "base": report.results["base"]}


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def markdown(rows: list[dict], base: dict) -> str:
    lines = [
        "| recipe | method | trainable params | % of total | saved | size on disk "
        "| exact match | ROUGE-L | perplexity |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        p, t = r["parameters"], r["tuned"]
        lines.append(
            f"| {r['recipe']} | {r['method']} | {p['trainable']:,} | {100 * p['trainable'] / p['total']:.3f}% "
            f"| {r['weights_dir']}/ | {_size(r['size_on_disk_bytes'])} | {t['exact_match']:.1f} "
            f"| {t['rougeL']:.1f} | {t['perplexity']:.3f} |"
        )
    base = base["base"]
    lines.append(
        f"| (base model, untuned) | | | | | | {base['exact_match']:.1f} | {base['rougeL']:.1f} "
        f"| {base['perplexity']:.3f} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=RECIPES, help="recipe names to run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_one(name, args.steps, args.examples, Path(tmp)) for name in args.only]
    base = run_base(args.examples)
    text = json.dumps({"methods": rows, "base": base}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.markdown:
        print(markdown(rows, base))


if __name__ == "__main__":
    main()
