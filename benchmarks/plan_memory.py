"""`llmtune plan` against measured peak memory on this machine, recipe by recipe.

Each case is planned for the CPU, then trained for a few steps through `llmtune finetune` while PyTorch's profiler
records every allocation and free of its CPU allocator. The measured peak is the bytes of the model's weights
and buffers when training starts plus the highest sum of the allocations still alive after that: the CPU's
counterpart of `torch.cuda.max_memory_allocated`. Batches are full (every row max_length tokens), as the plan
assumes. With --cuda, on a machine with a GPU, the run's `torch.cuda.max_memory_allocated` is recorded too.

    python benchmarks/plan_memory.py --out benchmarks/plan_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Case name -> (recipe, overrides). The text data is cut into blocks of max_length, so every batch is full.
LM = [
    "objective.name=lm",
    "data.format=text",
    "data.train=data/lm/train.txt",
    "data.eval=data/lm/eval.txt",
    "eval.metrics=[perplexity]",
]
CASES = {
    "smollm2-lora": ("lm.yaml", ["training.batch_size=4", "data.max_length=256"]),
    "smollm2-qlora": ("qlora.yaml", [*LM, "training.batch_size=4", "data.max_length=256"]),
    "smollm2-full": ("full.yaml", [*LM, "training.batch_size=2", "data.max_length=128"]),
    "smollm2-lora-adafactor": ("lm.yaml", ["training.batch_size=2", "training.optimizer=adafactor"]),
    "qwen2-shape-lora": ("lm.yaml", ["training.batch_size=4", "data.max_length=256"]),
    "qwen2-shape-full": ("full.yaml", [*LM, "training.batch_size=2", "data.max_length=128"]),
}


def random_qwen2(directory: Path) -> str:
    """A Qwen2-shaped model with random weights and SmolLM2's vocabulary: another family's layout (biased q/k/v,
    grouped-query attention, tied embeddings) at a size this machine trains in seconds."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=49152,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=10,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return str(directory)


def measure(recipe: Path, overrides: list[str], cuda: bool) -> dict:
    """Peak bytes of one short `llmtune finetune` run, from the allocator's events."""
    from torch.profiler import ProfilerActivity, profile

    import llmtune.run as run

    build = run._build_trainer
    found: dict = {}

    def profiled_trainer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        train = trainer.train

        def train_profiled(*a, **k):
            model = trainer.model
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.parameters()}
            storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.buffers()})
            started = time.time()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                result = train(*a, **k)
            events = sorted(
                (e.start_ns(), e.nbytes())
                for e in prof.profiler.kineto_results.events()
                if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
            )
            live = peak = 0
            for _, nbytes in events:
                live += nbytes
                peak = max(peak, live)
            found.update(weights=sum(storages.values()), peak=sum(storages.values()) + peak)
            found["seconds"] = time.time() - started
            if cuda:
                found["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
            return result

        trainer.train = train_profiled
        return trainer

    run._build_trainer = profiled_trainer
    try:
        run.finetune(recipe, overrides)
    finally:
        run._build_trainer = build
    return found


def run_case(name: str, steps: int, cuda: bool, tmp: Path) -> dict:
    """Plan and measure one case; in a process of its own, since the profiler records allocations in its first
    session only."""
    from llmtune.plan import device_info, plan_recipe
    from llmtune.recipe import load_recipe

    recipe_name, extra = CASES[name]
    recipe = REPO / "recipes" / recipe_name
    overrides = [
        *extra,
        f"training.max_steps={steps}",
        "training.save_steps=null",
        "training.report_to=[]",
        f"output.dir={tmp / name}",
    ]
    if name.startswith("qwen2"):
        overrides += [f"model={random_qwen2(tmp / 'qwen2')}", "tokenizer=builtin:smollm2-135m-instruct"]
    device = device_info(None if cuda else "cpu")
    started = time.time()
    plan = plan_recipe(load_recipe(recipe, overrides), device, both_checkpointing=False)
    plan_seconds = time.time() - started
    measured = measure(recipe, overrides, cuda)
    reference = measured.get("cuda_max_allocated", measured["peak"])
    return {
        "case": name,
        "recipe": f"recipes/{recipe_name}",
        "overrides": extra,
        "device": device.name,
        "planned_bytes": plan.total,
        "measured_bytes": reference,
        "error": round(plan.total / reference - 1, 4),
        "plan": plan.to_dict(),
        "measured": measured,
        "plan_seconds": round(plan_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cuda", action="store_true", help="also record torch.cuda.max_memory_allocated")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process measuring one case
    args = parser.parse_args()

    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(run_case(args.one, args.steps, args.cuda, Path(tmp))), flush=True)
        return

    results = []
    for name in args.cases:
        command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps)] + (
            ["--cuda"] if args.cuda else []
        )
        done = subprocess.run(command, capture_output=True, text=True)
        found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not found:
            sys.exit(f"{name}: the measuring process failed:\n{done.stderr[-3000:]}")
        result = json.loads(found[-1].removeprefix("RESULT "))
        results.append(result)
        print(
            f"{name}: planned {result['planned_bytes'] / 2**20:.0f} MiB, measured "
            f"{result['measured_bytes'] / 2**20:.0f} MiB ({100 * result['error']:+.1f}%)",
            flush=True,
        )
    report = {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__},
        "steps": args.steps,
        "cases": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
