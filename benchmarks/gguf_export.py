"""GGUF export of one model at every quantization the exporter writes, each read back and checked.

Prints JSON (and writes it with --out) with, per quantization: max |logit diff| against the float32 model on
the probes, whether greedy completions match, file size and export seconds per stage. The checks run with no
logit tolerance so every quantization is measured, not refused; greedy equality is still required for f32/f16.

    python benchmarks/gguf_export.py --model builtin:smollm2-135m-instruct --out benchmarks/gguf_export.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
from pathlib import Path

from llmtune.export import QUANTS, export_gguf


def cpu() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct", help="run directory or model reference")
    parser.add_argument("--quants", nargs="*", default=list(QUANTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants:
            result = export_gguf(args.model, Path(tmp) / f"model-{quant}.gguf", quant, tolerance=float("inf"))
            rows.append(
                {
                    "quant": quant,
                    "max_abs_logit_diff": result.max_abs_diff,
                    "vs_rounded_in_memory": result.rounded_max_abs_diff,
                    "greedy_equal": result.greedy_equal,
                    "probes": result.probes,
                    "size_mb": round(result.size_bytes / 1e6, 1),
                    "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
                    "f16_fallback": result.f16_fallback,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    report = {"model": args.model, "cpu": cpu(), "results": rows}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
