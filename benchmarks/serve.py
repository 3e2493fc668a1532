"""Load test of `pegasus-x serve` on loopback: batched serving against one-at-a-time serving, same run.

    python benchmarks/serve.py                          # 64 requests from 16 concurrent clients, demo model
    python benchmarks/serve.py --requests 32 --clients 8 --options '{"num_beams": 1}'
    python benchmarks/serve.py --random-base --requests 16 --words 60 \
        --options '{"num_beams": 1, "min_new_tokens": 32, "max_new_tokens": 32}'

Starts the server twice in a subprocess on 127.0.0.1 (a free port), first with ``--max-batch-size 1`` (one request
at a time: the baseline), then with its default batching, and sends both the same requests (different texts cut
from ``examples/sample.txt``, the checkpoint's generation options unless ``--options``) from concurrent clients.
Fails (exit 1) when a request is lost or not answered 200, or when a batched summary differs from its
one-at-a-time summary. Prints p50/p99 latency and throughput of each, and the throughput ratio batched/baseline.
Bounded: each phase stops after ``--timeout`` seconds. ``--random-base`` serves a pegasus-x-base-shaped model with
random weights (written to a temporary folder, deleted after) instead of the demo model: decode steps that stream
a large model's weights, where batching pays most on a CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from common import describe_cpu, sample_windows

ROOT = Path(__file__).resolve().parents[1]


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "pegasus_x", "serve", "--port", "0", *extra], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:  # warnings may come first (a model folder without a tokenizer)
        match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if match:
            break
    else:
        proc.kill()
        raise SystemExit("the server did not start")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # uvicorn's log: keep the pipe from filling
    url = match.group(1)
    for _ in range(600):
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not answer /healthz")


async def load(url: str, texts: list[str], options: dict, clients: int, timeout: float) -> dict:
    """Send every text from ``clients`` concurrent clients; latency per request, wall time, answers by index."""
    pending = list(enumerate(texts))
    answers: dict[int, dict] = {}
    latencies: list[float] = []
    failures: list[str] = []

    async def client(http: httpx.AsyncClient) -> None:
        while pending:
            index, text = pending.pop(0)
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/summarize", json={"text": text, **options})
            except httpx.HTTPError as exc:
                failures.append(f"request {index}: {type(exc).__name__}")
                continue
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                failures.append(f"request {index}: {response.status_code} {response.text[:200]}")
            else:
                answers[index] = response.json()

    async with httpx.AsyncClient(timeout=timeout) as http:
        for text in texts[:2]:  # warm-up, not measured: first-use costs (kernel loading, allocations)
            await http.post(f"{url}/v1/summarize", json={"text": text, **options})
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(clients))), timeout)
        wall = time.perf_counter() - start
        metrics = (await http.get(f"{url}/metrics")).text
    batches = re.search(r"^pegasus_x_batches_total (\S+)$", metrics, re.M)
    return {"answers": answers, "latencies": latencies, "failures": failures, "wall": wall,
            "batches": float(batches.group(1)) - 2 if batches else float("nan")}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_phase(name: str, extra: list[str], texts: list[str], args: argparse.Namespace) -> dict:
    proc, url = start_server(extra)
    try:
        result = asyncio.run(load(url, texts, args.options, args.clients, args.timeout))
    finally:
        proc.terminate()
        proc.wait(60)
    lat = result["latencies"]
    result["throughput"] = len(result["answers"]) / result["wall"]
    print(f"{name:<22} answered {len(result['answers'])}/{len(texts)}  batches {result['batches']:.0f}  "
          f"p50 {percentile(lat, 0.5):6.3f} s  p99 {percentile(lat, 0.99):6.3f} s  "
          f"throughput {result['throughput']:6.2f} req/s  wall {result['wall']:.1f} s", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--options", type=json.loads, default={}, help="generation options of every request (JSON)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per phase at most")
    parser.add_argument("--words", type=int, default=400, help="longest text in words (default: %(default)s)")
    parser.add_argument("--random-base", action="store_true", help="serve a pegasus-x-base-shaped model with "
                        "random weights instead of the demo model")
    args = parser.parse_args()
    texts = sample_windows(args.requests, args.words)
    with tempfile.TemporaryDirectory() as folder:
        model = []
        if args.random_base:
            import torch

            from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration

            torch.manual_seed(0)
            PegasusXForConditionalGeneration(PegasusXConfig.base()).save_pretrained(folder)
            model = ["--model", folder]
        return compare(texts, model, args)


def compare(texts: list[str], model: list[str], args: argparse.Namespace) -> int:
    name = "pegasus-x-base shape, random weights" if model else "demo model"
    print(f"pegasus-x serve load test: {name}, {args.requests} requests, {args.clients} concurrent clients, "
          f"options {args.options or 'the checkpoint defaults'}; {describe_cpu()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    alone = run_phase("one at a time", [*model, "--max-batch-size", "1"], texts, args)
    batched = run_phase("batched (defaults)", model, texts, args)
    problems = alone["failures"] + batched["failures"]
    lost = [i for i in range(len(texts)) if i not in alone["answers"] or i not in batched["answers"]]
    differ = [i for i in range(len(texts)) if i not in lost
              and alone["answers"][i]["summary"] != batched["answers"][i]["summary"]]
    print(f"lost: {len(lost)}   failed: {len(problems)}   batched summaries that differ from one-at-a-time: "
          f"{len(differ)}")
    for problem in problems[:5]:
        print(f"  {problem}")
    ratio = batched["throughput"] / alone["throughput"]
    print(f"throughput batched / one at a time: {ratio:.2f}x")
    return 1 if lost or problems or differ else 0


if __name__ == "__main__":
    sys.exit(main())
