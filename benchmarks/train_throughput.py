"""Training throughput: llmtune's finetune path against the plain TRL + PEFT script a user would write.

For each workload, in one run and in turn, two child processes train LoRA (r=8, alpha=16, dropout 0.05,
all-linear) on the builtin SmolLM2-135M-Instruct with the same rows, batch size, learning rate, schedule,
number of optimizer steps and seed; with `--method qlora`, over the same model quantized to 4-bit NF4:

- baseline: `trl.SFTTrainer` + `peft.LoraConfig` with TRL's defaults (no packing, padded batches, loss on the
  completion only, gradient checkpointing on in TRL 1.16), in float32 on the CPU and with `bf16=True` on a
  GPU, as a GPU user's script would have it;
- llmtune: `llmtune.run.finetune` on the quickstart recipe with its defaults.

Each child reports trained (loss-bearing) tokens per second, tokens seen including padding, the mean
training loss, and the held-out loss of the result (mean NLL over response tokens, computed for both by
the same function); the parent adds each child's peak resident memory (on a GPU: peak GPU memory allocated),
the matmul peak of this machine measured on the spot (fp32 and bf16), model FLOPs utilisation, and the
llmtune / baseline ratios.

    python benchmarks/train_throughput.py --out benchmarks/train_throughput.json
    python benchmarks/train_throughput.py --method qlora --steps 60 --untimed-steps 10 --out gpu-qlora.json

Workloads: `quickstart` (the quickstart rows, ~60 tokens each) and `mixed` (lists of 1 to 28 dates to
convert, rows of ~50 to ~512 tokens, where padding waste matters).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
MODEL = "builtin:smollm2-135m-instruct"
# Settings shared by both sides; the quickstart recipe has the same ones.
BATCH_SIZE, LEARNING_RATE, WARMUP, MAX_LENGTH = 8, 1.0e-3, 5, 512
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
# QLoRA's base: the qlora recipe's quantization; its matmuls in bf16 on a GPU, in float32 on the CPU.
QLORA = {"quant_type": "nf4", "double_quant": True}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _compute_dtype() -> str:
    return "bfloat16" if _cuda() else "float32"


# --- workloads -------------------------------------------------------------------------------------


def _mixed_rows(n: int, rng: random.Random) -> list[dict]:
    sys.path.insert(0, str(REPO / "recipes" / "data" / "quickstart"))
    from make_data import FORMATS

    start, end = datetime.date(1950, 1, 1).toordinal(), datetime.date(2049, 12, 31).toordinal()
    rows = []
    for _ in range(n):
        days = [datetime.date.fromordinal(rng.randint(start, end)) for _ in range(rng.randint(1, 28))]
        prompt = "Write each date in ISO format (YYYY-MM-DD), one per line:\n" + "\n".join(
            rng.choice(FORMATS)(d) for d in days
        )
        answer = "\n".join(d.isoformat() for d in days)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


def write_workload(name: str, root: Path) -> tuple[Path, Path]:
    if name == "quickstart":
        data = REPO / "recipes" / "data" / "quickstart"
        return data / "train.jsonl", data / "eval.jsonl"
    rng = random.Random(7)
    paths = []
    for split, n in (("train", 320), ("eval", 32)):
        path = root / f"mixed-{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _mixed_rows(n, rng)), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- children --------------------------------------------------------------------------------------


class StepMeter:
    """Counts tokens and time inside `Trainer.training_step`, identically for both sides.

    The first `untimed` steps are left out of both: on a GPU they hold CUDA's and the kernels' warm-up."""

    def __init__(self, untimed: int = 0) -> None:
        self.untimed = untimed
        self.loss_tokens = self.tokens = self.padded_tokens = self.micro_steps = 0
        self.start = self.end = None
        self.peak_rss_kib = self.peak_gpu_bytes = 0
        self.lengths: list[int] = []

    def install(self) -> None:
        import torch
        from transformers import Trainer

        original = Trainer.training_step
        meter = self
        cuda = torch.cuda.is_available()

        def start() -> None:
            if cuda:  # the training peak, not the loading's
                torch.cuda.reset_peak_memory_stats()
            meter.start = time.perf_counter()

        def training_step(trainer, model, inputs, num_items_in_batch=None):
            if meter.start is None and not meter.untimed:
                start()
            loss = original(trainer, model, inputs, num_items_in_batch)
            if cuda:  # the Trainer waits for each step's loss anyway (its NaN filter); the clock must too
                torch.cuda.synchronize()
                meter.peak_gpu_bytes = torch.cuda.max_memory_allocated()
            if meter.untimed:
                meter.untimed -= 1
                start()
                return loss
            meter.end = time.perf_counter()
            labels = inputs["labels"]
            meter.loss_tokens += int((labels[:, 1:] != -100).sum())
            meter.padded_tokens += labels.numel()
            mask, bounds = inputs.get("attention_mask"), inputs.get("cu_seq_lens_q")
            if bounds is not None:  # a padding-free batch: its rows end to end in one sequence
                real = bounds.diff().tolist()
            else:
                real = mask.sum(1).tolist() if mask is not None else [labels.size(1)] * labels.size(0)
            meter.tokens += int(sum(real))
            meter.lengths += [int(x) for x in real]
            meter.micro_steps += 1
            # The training peak: afterwards the llmtune side reloads its run from disk to score it.
            meter.peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return loss

        Trainer.training_step = training_step

    def report(self) -> dict:
        seconds = self.end - self.start
        return {
            "train_seconds": round(seconds, 2),
            "micro_steps": self.micro_steps,
            "loss_tokens": self.loss_tokens,
            "tokens": self.tokens,
            "tokens_with_padding": self.padded_tokens,
            "padding_share": round(1 - self.tokens / self.padded_tokens, 4),
            "trained_tokens_per_s": round(self.loss_tokens / seconds, 2),
            "tokens_per_s": round(self.tokens / seconds, 2),
            "mean_row_tokens": round(sum(self.lengths) / len(self.lengths), 1),
            "training_peak_rss_mib": round(self.peak_rss_kib / 1024, 1),
            **({"training_peak_gpu_mib": round(self.peak_gpu_bytes / 2**20, 1)} if self.peak_gpu_bytes else {}),
        }


def held_out_loss(model, tokenizer, eval_path: Path) -> float:
    """Mean NLL per response token over the held-out rows, with llmtune's tokenization for both sides."""
    from llmtune.accel import on_device
    from llmtune.data import Sample, encode
    from llmtune.evaluation import response_nll

    encoded = [encode(Sample(messages=r["messages"]), tokenizer) for r in _read_rows(eval_path)]
    model = on_device(model).float().eval()
    nll, count = response_nll(model, tokenizer, [e[0] for e in encoded], [e[1] for e in encoded], batch_size=8)
    return nll / count


def run_baseline(job: argparse.Namespace) -> dict:
    """The plain script (job.set, recipe overrides, are for the llmtune side)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from llmtune.models import resolve_checkpoint

    checkpoint = resolve_checkpoint(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if job.method == "qlora":
        dtype = getattr(torch, _compute_dtype())
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=QLORA["quant_type"],
            bnb_4bit_use_double_quant=QLORA["double_quant"],
            bnb_4bit_compute_dtype=dtype,
        )
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, quantization_config=quantization)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    # Conversational prompt / completion: TRL applies the chat template and takes loss on the completion only.
    rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in _read_rows(job.train)]
    args = SFTConfig(
        output_dir=str(job.workdir / "baseline"),
        max_steps=job.steps,
        per_device_train_batch_size=BATCH_SIZE,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP,
        seed=job.seed,
        data_seed=job.seed,
        max_length=MAX_LENGTH,
        bf16=_cuda(),  # float32 on the CPU (TRL's default); on a GPU the plain script asks for bf16
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=not _cuda(),
    )
    peft_config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    meter = StepMeter(job.untimed_steps)
    meter.install()
    output = trainer.train()
    return {
        **meter.report(),
        "train_loss": output.training_loss,
        "eval_loss": held_out_loss(trainer.model, tokenizer, job.eval),
    }


def run_llmtune(job: argparse.Namespace) -> dict:
    from llmtune.models import load_tuned
    from llmtune.run import finetune

    overrides = job.set
    if job.method == "qlora":
        quantization = [f"method.{key}={str(value).lower()}" for key, value in QLORA.items()]
        overrides = ["method.name=qlora", f"method.compute_dtype={_compute_dtype()}", *quantization, *overrides]
    overrides = [
        *overrides,
        f"data.train={job.train}",
        f"data.eval={job.eval}",
        f"data.max_length={MAX_LENGTH}",
        f"training.max_steps={job.steps}",
        f"training.seed={job.seed}",
        "training.save_steps=null",
        "training.logging_steps=5",
        f"output.dir={job.workdir / 'llmtune'}",
    ]
    meter = StepMeter(job.untimed_steps)
    meter.install()
    result = finetune(QUICKSTART, overrides)
    model, tokenizer = load_tuned(result.run.path)
    return {
        **meter.report(),
        "train_loss": result.metrics["train_loss"],
        "eval_loss": held_out_loss(model, tokenizer, job.eval),
        "recipe_settings": _lever_settings(result),
    }


def _lever_settings(result) -> dict:
    """The speed plan the run resolved, and the training settings that change its batches."""
    from llmtune.artifacts import SPEED_FILE

    t = result.run.recipe().training
    plan = json.loads(result.run.file(SPEED_FILE).read_text())
    return {**plan, "group_by_length": t.group_by_length}


CHILDREN = {"baseline": run_baseline, "llmtune": run_llmtune}


def child_main(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(args.seed)
    report = CHILDREN[args.child](args)
    args.result.write_text(json.dumps(report), encoding="utf-8")


def spawn(side: str, args: argparse.Namespace, train: Path, eval_path: Path, workdir: Path) -> dict:
    """Runs one side in a child process with the parent's settings; its report and peak resident memory."""
    result = workdir / f"{side}.json"
    command = [
        sys.executable,
        __file__,
        "--child",
        side,
        "--train",
        str(train),
        "--eval",
        str(eval_path),
        "--workdir",
        str(workdir),
        "--result",
        str(result),
        f"--steps={args.steps}",
        f"--seed={args.seed}",
        f"--method={args.method}",
        f"--untimed-steps={args.untimed_steps}",
        *(f"--set={o}" for o in args.set),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    log = workdir / f"{side}.log"
    # A file, not a pipe: nobody reads a pipe while wait4 blocks, and a full one would stall the child.
    with log.open("w") as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{side} child failed:\n{log.read_text()[-4000:]}")
    report = json.loads(result.read_text(encoding="utf-8"))
    report["process_peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux
    return report


# --- FLOPs and the machine's peak ------------------------------------------------------------------


def measure_matmul_peak(dtype_name: str, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matmul in `dtype_name` on the device training uses, best of `repeats`."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 2048  # a GPU needs the larger product to reach its peak
    dtype = getattr(torch, dtype_name)
    a, b = (torch.randn(n, n).to(dtype).to("cuda" if cuda else "cpu") for _ in range(2))
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def _cpu_model() -> str:
    """The CPU's model name as Linux reports it; machines of one name can differ widely in bf16 units."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def model_flops(report: dict) -> float:
    """FLOPs the LoRA step needs for the tokens this side trained on, whatever it computed beyond them.

    Per token in the blocks: forward 2N, backward with respect to the activations 2N (the frozen weights
    get no gradient; LoRA's own weights are under 0.5% of N and left out). Attention adds, per token and
    layer, 4 * d * c forward (scores and weighted sum over c attended positions, c = (len + 1) / 2 under the
    causal mask) and twice that backward. The output head (vocab x d) is needed only at loss-bearing
    positions: 2 * V * d forward and 2 * V * d backward there.
    """
    from transformers import AutoConfig

    from llmtune.models import resolve_checkpoint

    c = AutoConfig.from_pretrained(resolve_checkpoint(MODEL))
    d, layers, ff, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = d // c.num_attention_heads * c.num_key_value_heads
    block_params = layers * (2 * d * d + 2 * d * kv + 3 * d * ff)
    attended = (report["mean_row_tokens"] + 1) / 2
    per_token = 4 * block_params + 3 * 4 * layers * d * attended
    return report["tokens"] * per_token + report["loss_tokens"] * 4 * vocab * d


def _memory_ratio(fast: dict, base: dict) -> dict:
    key = "training_peak_gpu_mib" if "training_peak_gpu_mib" in base else "training_peak_rss_mib"
    return {key.removesuffix("_mib"): round(fast[key] / base[key], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per side and workload")
    parser.add_argument("--workloads", nargs="*", default=["quickstart", "mixed"])
    parser.add_argument("--seed", type=int, default=0, help="seed of both sides: initialisation, dropout, row order")
    parser.add_argument(
        "--method", choices=("lora", "qlora"), default="lora", help="qlora: both sides on a 4-bit NF4 base"
    )
    parser.add_argument(
        "--untimed-steps",
        type=int,
        default=0,
        help="first steps of each side left out of the tokens/s (on a GPU: warm-up); the steps still train",
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--keep", type=Path, help="keep each side's log, result and run directory here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the llmtune side, e.g. training.bf16=false to measure one lever without the others",
    )
    parser.add_argument(
        "--sides",
        nargs="*",
        choices=CHILDREN,
        default=list(CHILDREN),
        help="which sides to run; the ratios need both (llmtune alone measures a lever against a previous run)",
    )
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 <= args.untimed_steps < args.steps:
        parser.error(f"--untimed-steps must leave some of the {args.steps} steps timed (got {args.untimed_steps})")
    if args.child:
        child_main(args)
        return

    import torch

    peaks = {dtype: round(measure_matmul_peak(dtype), 1) for dtype in ("float32", "bfloat16")}
    machine = {"cpu": _cpu_model(), "cpu_threads": torch.get_num_threads(), "matmul_peak_gflops": peaks}
    if torch.cpu._is_amx_tile_supported():  # bf16 matrix tiles: a bf16 peak several times the float32 one
        machine["cpu_bf16_units"] = "amx"
    elif torch.cpu._is_avx512_bf16_supported():
        machine["cpu_bf16_units"] = "avx512_bf16"
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    results = {
        "machine": machine,
        "versions": {
            name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "trl", "bitsandbytes")
        },
        "settings": {
            "model": MODEL,
            "steps": args.steps,
            "seed": args.seed,
            "untimed_steps": args.untimed_steps,
            "method": args.method,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "lora": LORA,
            "max_length": MAX_LENGTH,
            "llmtune_overrides": args.set,
        },
        "workloads": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.workloads:
            workdir = (args.keep or Path(tmp)) / name
            workdir.mkdir(parents=True, exist_ok=True)
            train, eval_path = write_workload(name, workdir)
            sides = {side: spawn(side, args, train, eval_path, workdir) for side in args.sides}
            for report in sides.values():
                achieved = model_flops(report) / report["train_seconds"] / 1e9
                report["model_gflops_per_s"] = round(achieved, 1)
                report["mfu_vs_bf16_peak"] = round(achieved / peaks["bfloat16"], 3)
                report["mfu_vs_fp32_peak"] = round(achieved / peaks["float32"], 3)
            if len(sides) == len(CHILDREN):
                fast, base = sides["llmtune"], sides["baseline"]
                sides["ratio_llmtune_over_baseline"] = {
                    "trained_tokens_per_s": round(fast["trained_tokens_per_s"] / base["trained_tokens_per_s"], 2),
                    **_memory_ratio(fast, base),
                    "eval_loss": round(fast["eval_loss"] / base["eval_loss"], 4),
                }
            results["workloads"][name] = sides
            print(json.dumps({name: sides.get("ratio_llmtune_over_baseline", sides)}), flush=True)
            if args.out:  # after each workload: a run cut short keeps what it measured
                args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
