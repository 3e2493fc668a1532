"""Lookahead decoding (``prompt_lookup_num_tokens``): what a verification pass costs and how many passes it saves.

    python benchmarks/lookahead.py cost                   # base shape, random weights: 1+K rows vs one plain step
    python benchmarks/lookahead.py cost --lengths 1024 4096 --dtypes fp32 --ks 4 8 --reps 7
    python benchmarks/lookahead.py gain                   # the demo model over held-out manual pages, greedy
    python benchmarks/lookahead.py gain --pages 40 --ks 4 8 --max-input-tokens 256

``cost``: one fresh process per (input length, dtype). Random base-size weights (``PegasusXConfig.base()``), one
input of random encoder states (the encoder does not matter here: only the cross-attention keys/values it leaves),
32 decoded positions in the cache. Then, in turn (round robin, ``--reps`` times, median): one plain decode step
(what greedy search runs per token: the fused native step when the kernels are built) and one pass over the current
token + K draft tokens with the logits of every position (what lookahead runs: the native ``decoder_rows`` kernel;
with ``--torch-too`` also through the torch layers), rolling the cache back after each.
Printed: milliseconds and the ratio pass(1+K) / plain step. Bar of issue #19: K = 8 at most 1.3x at 4,096 and
16,384 tokens.

``gain``: the bundled demo model (trained) over the test split of this machine's manual pages (the split rule of
``examples/manpages/prepare.py``: pages the demo never saw), rendered once into ``--data``. Greedy search with the
demo's generation options (no-repeat 3-grams, forced EOS, at most 48 new tokens) and ``num_beams=1``; one page at a
time, plain and lookahead alternating page by page. Printed: decoder passes per generated token, wall-time
speedup, and whether every output was token-identical.

Last, the projection for base size: tokens per pass (from ``gain``) / cost ratio (from ``cost``) — a projection
until measured with a fine-tuned base checkpoint, whose summaries copy from the source differently from the demo's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 32          # decoded positions in the cache before the timed passes


# ---------------------------------------------------------------------------------------------------- cost
def cost_child(spec: dict) -> dict:
    """Time plain steps and 1+K passes on one base-size cache (see the module docstring)."""
    import torch

    from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration, native
    from pegasus_x.cache import new_cache
    from pegasus_x.generate import make_step

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model = PegasusXForConditionalGeneration(PegasusXConfig.base()).to(dtype).eval()
    D, S, V = model.config.d_model, spec["length"], model.config.vocab_size
    timings: dict[str, list[float]] = {"plain": [], **{f"K={k}": [] for k in spec["ks"]},
                                       **{f"K={k} torch": [] for k in spec["ks"] if spec["torch_too"]}}
    with torch.inference_mode():
        states = torch.randn(1, S, D).to(dtype)
        cache = new_cache(model, states, torch.ones(1, S, dtype=torch.bool), 1, CONTEXT + max(spec["ks"]) + 2)
        step = make_step(model, cache)
        step(torch.randint(2, V, (1, CONTEXT)))
        tokens = torch.randint(2, V, (1, 1 + max(spec["ks"])))

        def run(name: str) -> float:
            rows_kernel = native.decoder_rows_fit
            if name.endswith("torch"):             # the pass through the torch layers instead of decoder_rows
                native.decoder_rows_fit = lambda *_: False
            t = time.perf_counter()
            if name == "plain":
                step(tokens[:, :1])
            else:
                step(tokens[:, :1 + int(name.split()[0][2:])], every=True)
            elapsed = time.perf_counter() - t
            native.decoder_rows_fit = rows_kernel
            cache.rollback(CONTEXT)
            return elapsed
        for name in timings:                         # warm-up
            run(name)
        for _ in range(spec["reps"]):
            for name in timings:
                timings[name].append(run(name))
    return {name: statistics.median(ts) * 1e3 for name, ts in timings.items()}


def cost(args) -> dict:
    results = {}
    for length in args.lengths:
        for dtype in args.dtypes:
            spec = dict(length=length, dtype=dtype, ks=args.ks, reps=args.reps, threads=args.threads,
                        torch_too=args.torch_too)
            proc = subprocess.run([sys.executable, __file__, "child", json.dumps(spec)], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"cost child failed for {spec}")
            ms = json.loads(proc.stdout.strip().splitlines()[-1])
            results[(length, dtype)] = ms
            ratios = "  ".join(f"{name}: {ms[name]:.1f} ms = {ms[name] / ms['plain']:.2f}x" for name in ms
                               if name != "plain")
            print(f"cost  {length:>6} tokens {dtype}: plain step {ms['plain']:.1f} ms  {ratios}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------- gain
def held_out_pages(folder: Path, limit: int) -> list[dict]:
    """The test split of this machine's manual pages (``prepare.py``'s rule), rendered once into ``folder``."""
    file = folder / "test.jsonl"
    if not file.exists():
        sys.path.insert(0, str(ROOT / "examples" / "manpages"))
        import prepare

        seen, rows = set(), []
        for path in prepare.page_files(Path("/usr/share/man")):
            if prepare.split_of(path.name) != "test":
                continue
            example = prepare.to_example(path)
            if example is None or example["source"] in seen:
                continue
            seen.add(example["source"])
            rows.append(example)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, file)
    rows = [json.loads(line) for line in file.read_text().splitlines()]
    return rows[:limit]


def gain(args) -> dict:
    import torch

    from pegasus_x import PegasusXForConditionalGeneration
    from pegasus_x.summarize import demo_model_path
    from pegasus_x.tokenizer import PegasusTokenizer

    torch.set_num_threads(args.threads)
    pages = held_out_pages(Path(args.data), args.pages)
    if not pages:
        raise SystemExit("no held-out manual pages on this machine (apt-get install man-db manpages)")
    model = PegasusXForConditionalGeneration.from_pretrained(demo_model_path(), dtype=torch.float32).eval()
    tok = PegasusTokenizer.from_pretrained(demo_model_path())
    options = dict(num_beams=1, return_dict_in_generate=True)
    encoded = [tok([p["source"]], return_tensors="pt", truncation=True, max_length=args.max_input_tokens)
               for p in pages]
    results = {}
    with torch.inference_mode():
        model.generate(encoded[0]["input_ids"], max_new_tokens=4, num_beams=1)          # warm-up
        stats = {k: dict(time=0.0, passes=0, plain_time=0.0, tokens=0, same=0) for k in args.ks}
        for enc in encoded:
            for k in args.ks:                         # plain and lookahead back to back, page by page
                t = time.perf_counter()
                plain = model.generate(enc["input_ids"], **options)
                t1 = time.perf_counter()
                ahead = model.generate(enc["input_ids"], prompt_lookup_num_tokens=k, **options)
                t2 = time.perf_counter()
                s = stats[k]
                s["plain_time"] += t1 - t
                s["time"] += t2 - t1
                s["passes"] += ahead.decoder_passes
                s["tokens"] += plain.decoder_passes                  # one pass per generated token
                s["same"] += int(torch.equal(plain.sequences, ahead.sequences))
    for k, s in stats.items():
        per_token = s["passes"] / s["tokens"]
        results[k] = dict(passes_per_token=per_token, speedup=s["plain_time"] / s["time"])
        print(f"gain  demo model, {len(pages)} held-out pages (input <= {args.max_input_tokens} tokens), greedy, "
              f"K={k}: {s['tokens']} tokens in {s['passes']} passes = {per_token:.3f} passes/token; wall time "
              f"plain {s['plain_time']:.2f} s, lookahead {s['time']:.2f} s = {results[k]['speedup']:.2f}x; "
              f"token-identical on {s['same']}/{len(pages)} pages", flush=True)
    return results


def project(costs: dict, gains: dict) -> None:
    """Projected decode speedup at base size: (tokens per pass) / (cost of a pass relative to a plain step)."""
    for (length, dtype), ms in costs.items():
        for k, g in gains.items():
            name = f"K={k}"
            if name in ms:
                speed = (1 / g["passes_per_token"]) / (ms[name] / ms["plain"])
                print(f"projection  base size, {length} tokens, {dtype}, K={k}: "
                      f"{1 / g['passes_per_token']:.2f} tokens/pass / {ms[name] / ms['plain']:.2f}x per pass = "
                      f"{speed:.2f}x decode speed (a projection from the demo model's acceptance, not a "
                      "measurement on a fine-tuned base checkpoint)")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        print(json.dumps(cost_child(json.loads(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("cost", "gain", "all"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--torch-too", action="store_true", help="also time the pass through the torch layers "
                        "(without the native decoder_rows kernel)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--max-input-tokens", type=int, default=256)
    parser.add_argument("--data", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "pegasus-x-manpages"))
    args = parser.parse_args()
    costs = cost(args) if args.what in ("cost", "all") else {}
    gains = gain(args) if args.what in ("gain", "all") else {}
    if costs and gains:
        project(costs, gains)


if __name__ == "__main__":
    main()
