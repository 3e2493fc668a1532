"""The main job, summarizing documents with the bundled demo model: ours vs the reference (transformers), same run.

    python benchmarks/summarize.py                          # 64 texts, one at a time and in batches of 8
    python benchmarks/summarize.py --texts 32 --batches 1 16 --rounds 3
    python benchmarks/summarize.py --options '{"num_beams": 1}'     # greedy instead of the checkpoint's beam search

Both implementations load the demo checkpoint (``src/pegasus_x/assets/demo``) and get the same token ids: texts of
30 to ``--words`` words cut from ``examples/sample.txt`` (``common.py``), tokenized once by our tokenizer, sorted by
length and cut into batches of each ``--batches`` size (what ``Summarizer`` does with a list), right-padded with an
attention mask; both models in ``--dtype`` (fp32: what ``Summarizer`` picks on a CPU without AVX512-BF16 or AMX).
Each configuration (implementation × batch size) runs in a fresh process: it warms up on two batches, then times
``generate`` over every batch (encoder and decoding; tokenizing is ``tokenizer.py``'s subject) with the
checkpoint's generation options (beam 4, no-repeat 3-grams, at most 48 new tokens) unless ``--options``. Rounds
alternate the implementations. Printed: milliseconds per text (median over rounds), ours ÷ reference, peak RSS,
and how many summaries are token-identical to the reference's and, batched, to the same implementation's summaries
one text at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import describe_cpu, sample_windows

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "pegasus_x" / "assets" / "demo"


def run_child(spec: dict) -> dict:
    """Load one implementation, warm up, time ``generate`` over every batch; the sequences and peak RSS."""
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["impl"] == "ours":
        from pegasus_x import PegasusXForConditionalGeneration
    else:
        from transformers import PegasusXForConditionalGeneration
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[spec["dtype"]])
    model = PegasusXForConditionalGeneration.from_pretrained(str(DEMO), dtype=dtype).eval()
    batches = []
    for rows in spec["batches"]:
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        batches.append((ids, (ids != 0).long()))
    with torch.inference_mode():
        for ids, mask in batches[:2]:
            model.generate(ids, attention_mask=mask, **spec["options"])
        start = time.perf_counter()
        out = [model.generate(ids, attention_mask=mask, **spec["options"]) for ids, mask in batches]
        seconds = time.perf_counter() - start
    sequences = [_summary(row.tolist()[1:], model.config.eos_token_id, model.config.pad_token_id)
                 for o in out for row in o]
    return dict(seconds=seconds, sequences=sequences,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def _summary(ids: list[int], eos: int, pad: int) -> list[int]:
    """A generated row up to its first EOS, without padding (a batch pads finished rows: the reference with EOS)."""
    ids = ids[:ids.index(eos) + 1] if eos in ids else ids
    return [t for t in ids if t != pad]


def tokenize(spec: dict) -> list[list[int]]:
    """The texts' ids by our tokenizer (in a child: the parent stays small, see ``_spawn``)."""
    from pegasus_x import PegasusTokenizer

    tokenizer = PegasusTokenizer.from_pretrained(str(DEMO))
    return [tokenizer.encode(text) for text in spec["texts"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--words", type=int, default=400, help="longest text in words (shortest: 30)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="texts per generate call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--options", default="{}", help="generation options as JSON (default: the checkpoint's)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="both models' dtype (the checkpoint stores bf16; Summarizer picks fp32 on this CPU unless "
                             "it has AVX512-BF16 or AMX)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(tokenize(spec) if spec["impl"] == "tokens" else run_child(spec)))
        return
    if args.texts < 3 or args.words < 31 or min(args.batches) < 1 or args.rounds < 1:
        parser.error("--texts must be at least 3, --words at least 31, --batches and --rounds at least 1")
    options = json.loads(args.options)
    rows = sorted(_spawn({"impl": "tokens", "texts": sample_windows(args.texts, args.words)}), key=len)
    print(f"summarize: demo model, {args.texts} texts ({min(map(len, rows))}-{max(map(len, rows))} tokens), options "
          f"{options or 'the checkpoint defaults'}, {args.dtype}; {describe_cpu()}, {args.threads} "
          f"threads, {time.strftime('%Y-%m-%d %H:%M')}")
    alone: dict[str, list] = {}                    # each implementation's summaries one text at a time
    for size in sorted(args.batches):
        spec = dict(threads=args.threads, options=options, dtype=args.dtype,
                    batches=[rows[i:i + size] for i in range(0, len(rows), size)])
        runs: dict[str, list[dict]] = {"ours": [], "reference": []}
        for _ in range(args.rounds):
            for impl in runs:
                runs[impl].append(_spawn({**spec, "impl": impl}))
        ms = {impl: statistics.median(1e3 * r["seconds"] / len(rows) for r in got) for impl, got in runs.items()}
        out = {impl: got[0]["sequences"] for impl, got in runs.items()}
        if size == 1:
            alone = out
        rss = {impl: max(r["peak_rss_gb"] for r in got) for impl, got in runs.items()}
        print(f"batch {size:>3}: ours {ms['ours']:7.1f} ms/text  reference {ms['reference']:7.1f} ms/text  "
              f"ours/reference {ms['ours'] / ms['reference']:.2f}  (rounds: ours "
              + " ".join(f"{1e3 * r['seconds'] / len(rows):.1f}" for r in runs["ours"]) + ", reference "
              + " ".join(f"{1e3 * r['seconds'] / len(rows):.1f}" for r in runs["reference"])
              + f")  peak RSS {rss['ours']:.2f} / {rss['reference']:.2f} GB", flush=True)
        print(f"           summaries: ours = reference {_same(out['ours'], out['reference'])}"
              + (f", ours = ours one at a time {_same(out['ours'], alone['ours'])}, reference = reference one at a "
                 f"time {_same(out['reference'], alone['reference'])}" if alone and size > 1 else ""), flush=True)


def _same(a: list, b: list) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


# The parent imports no torch: a child's peak RSS (ru_maxrss) would start from the parent's at fork.
def _spawn(spec: dict) -> Any:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{spec['impl']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
