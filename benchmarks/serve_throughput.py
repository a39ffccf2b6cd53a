"""Serving throughput: `llmtune serve` answering N chat requests at several concurrencies, against one at a time.

In one run, over one loaded model: the baseline completes the N prompts one after another straight through the
library (`Generator.generate`, no HTTP, no batching); then the server, started in this process on a free port,
answers the same N requests through the official `openai` client from 1, 4 and 16 client threads. Every request is
greedy with the same max_tokens, so all sides generate the same tokens. Reports requests/s, generated tokens/s,
p50 and p90 latency, the batches the server ran, and each side's speed-up over the baseline, with the CPU (lscpu)
and the load average (the machines are shared).

    python benchmarks/serve_throughput.py --requests 32 --max-tokens 32 --out benchmarks/serve_throughput.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import socket
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODEL = "builtin:smollm2-135m-instruct"
TOPICS = ["rivers", "bread", "the moon", "chess", "rain", "bicycles", "owls", "glass", "music", "maps"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    """Distinct short questions of a few lengths, as chat clients send them."""
    asks = ["Name one fact about {}.", "Write one sentence about {}.", "In a few words, why do people like {}?"]
    return [[{"role": "user", "content": asks[i % 3].format(TOPICS[i % len(TOPICS)])}] for i in range(n)]


def _cpu() -> dict[str, str | int]:
    """The CPU as lscpu names it: machines here differ between sessions and rates move with them."""
    fields = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    except (OSError, subprocess.CalledProcessError):
        pass
    name = fields.get("Model name", "").strip() or platform.processor() or platform.machine()
    return {"model": name, "cpus": os.cpu_count() or 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(latencies: list[float], tokens: int, wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "requests_per_s": round(len(latencies) / wall, 3),
        "generated_tokens_per_s": round(tokens / wall, 1),
        "generated_tokens": tokens,
        "wall_s": round(wall, 2),
        "p50_latency_s": round(statistics.median(ordered), 3),
        "p90_latency_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
    }


def sequential(generator, conversations, max_tokens: int) -> dict[str, float]:
    from llmtune.generation import Sampling

    sampling = Sampling(max_new_tokens=max_tokens)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for messages in conversations:
        began = time.perf_counter()
        [completion] = generator.generate([generator.encode(messages)], sampling)
        latencies.append(time.perf_counter() - began)
        tokens += completion.tokens
    return _summary(latencies, tokens, time.perf_counter() - start)


def concurrent(client, health, conversations, max_tokens: int, workers: int, name: str) -> dict[str, float]:
    def ask(messages) -> tuple[float, int]:
        began = time.perf_counter()
        answer = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=max_tokens)
        return time.perf_counter() - began, answer.usage.completion_tokens

    before = health()
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(ask, conversations))
    wall = time.perf_counter() - start
    batches = health()["batches"] - before["batches"]
    summary = _summary([r[0] for r in results], sum(r[1] for r in results), wall)
    return {**summary, "batches": batches, "mean_batch_size": round(len(conversations) / batches, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=MODEL, help="run directory or model reference to serve")
    parser.add_argument("--requests", type=int, default=32, help="requests per side")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import openai
    import torch
    import uvicorn

    from llmtune.generation import load_generator
    from llmtune.serve import build_app

    load_before = os.getloadavg()[0]  # the machines are shared: a busy one halves every rate
    generator = load_generator(args.target)
    conversations = prompts(args.requests)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(generator, args.max_batch_size), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=600)

    def health() -> dict:
        import urllib.request

        with urllib.request.urlopen(f"{base}/health") as response:
            return json.load(response)

    # One untimed request each way: the first forward pass allocates and warms the kernels.
    sequential(generator, conversations[:1], args.max_tokens)
    concurrent(client, health, conversations[:1], args.max_tokens, 1, generator.name)

    results = {"sequential_library": sequential(generator, conversations, args.max_tokens)}
    for workers in args.concurrency:
        results[f"concurrency_{workers}"] = concurrent(
            client, health, conversations, args.max_tokens, workers, generator.name
        )
    server.should_exit = True
    thread.join()

    baseline = results["sequential_library"]["requests_per_s"]
    report = {
        "benchmark": "serve_throughput",
        "date": datetime.date.today().isoformat(),
        "cpu": _cpu(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "fastapi", "uvicorn")},
        "target": args.target,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "results": results,
        "speedup_vs_sequential": {
            side: round(r["requests_per_s"] / baseline, 2)
            for side, r in results.items()
            if side != "sequential_library"
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
