"""Beam search's cache reorder: ours vs the reference (transformers' ``DynamicCache.reorder_cache``), same run.

    python benchmarks/cache.py                                   # base decoder shape, beam 4
    python benchmarks/cache.py --lengths 64 512 --beams 8 --repeats 50

Every beam-search step hands each decoder row the history of the hypothesis it extends: row i takes the cached
self-attention keys/values of old row ``parent[i]``. A trained model moves most rows most steps (the bundled demo
model moved 2.9 of its 4 beams per step over 32 texts of ``common.py``); random weights move few, so
``benchmarks/generate.py`` barely exercises this. Here both caches hold the same random keys/values of the
pegasus-x-base decoder shape (12 layers, 12 heads of 64) for ``--beams`` rows at each filled length, and each
reorder is timed for three parent patterns: one row moved, all but one moved (a chain), all moved (swaps).

Ours: :meth:`pegasus_x.cache.DecoderCache.reorder` (the self-attention part; its cross-attention keys/values are
per input and never move). Reference: ``DynamicCache.reorder_cache`` (``index_select`` of every row of every
layer; in transformers' beam search the cross-attention cache, one copy per beam, is reordered too, which is not
timed here). Also timed: "indexed", the same moved rows by one indexed gather and scatter per buffer (ours before
it copied slices). Printed: median ms per reorder over ``--repeats`` (the better of two alternating runs), and
ours ÷ reference; the CPU is named above the table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import describe_cpu

LAYERS, HEADS, HEAD_DIM = 12, 12, 64


def patterns(beams: int) -> dict[str, list[int]]:
    """Parent rows: one row moved, all but row 0 moved (each takes the row before), every row moved (swaps)."""
    one = list(range(beams))
    one[-1] = beams - 2
    chain = [0] + list(range(beams - 1))
    swaps = [i ^ 1 if (i ^ 1) < beams else i for i in range(beams)]
    return {"1 moved": one, f"{beams - 1} moved": chain, f"{sum(p != i for i, p in enumerate(swaps))} swapped": swaps}


def ours(beams: int, length: int, g: torch.Generator):
    from pegasus_x.cache import DecoderCache

    shape = (LAYERS, beams, HEADS, length, HEAD_DIM)
    cache = DecoderCache(keys=torch.randn(shape, generator=g), values=torch.randn(shape, generator=g), cross_k=[],
                         cross_v=[], encoder_keep=None, limit=length, length=length)
    return lambda rows: cache.reorder(rows)


def indexed(beams: int, length: int, g: torch.Generator):
    """The moved rows by one indexed gather and scatter per buffer (what DecoderCache.reorder did before)."""
    buffers = [torch.randn(LAYERS, beams, HEADS, length, HEAD_DIM, generator=g) for _ in range(2)]

    def reorder(rows: torch.Tensor) -> None:
        dst = (rows != torch.arange(rows.numel())).nonzero().squeeze(1)
        for buf in buffers:
            buf[:, dst] = buf[:, rows[dst]]
    return reorder


def reference(beams: int, length: int, g: torch.Generator):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(beams, HEADS, length, HEAD_DIM, generator=g),
                     torch.randn(beams, HEADS, length, HEAD_DIM, generator=g), layer)
    return lambda rows: cache.reorder_cache(rows)


def timed(reorder, rows: torch.Tensor, repeats: int) -> float:
    reorder(rows)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reorder(rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 256, 512], help="filled positions")
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.beams < 2:
        parser.error("--beams must be at least 2 (one beam never reorders)")
    torch.set_num_threads(args.threads)
    import transformers

    print(f"cache reorder: base decoder shape ({LAYERS} layers × {HEADS} heads × {HEAD_DIM}), {args.beams} beams, "
          f"fp32; {describe_cpu()}, {args.threads} threads; transformers {transformers.__version__}")
    print(f"{'length':>6} {'parents':>10} | {'ours ms':>8} {'indexed':>8} {'ref ms':>8} {'ours/ref':>8}")
    g = torch.Generator().manual_seed(0)
    for length in args.lengths:
        impls = {"ours": ours(args.beams, length, g), "indexed": indexed(args.beams, length, g),
                 "ref": reference(args.beams, length, g)}
        for name, parents in patterns(args.beams).items():
            rows = torch.tensor(parents)
            # Alternate the two, twice, and keep each one's better median (a shared machine drifts).
            ms = {k: [] for k in impls}
            for _ in range(2):
                for key, reorder in impls.items():
                    ms[key].append(timed(reorder, rows, args.repeats))
            o, i, r = min(ms["ours"]), min(ms["indexed"]), min(ms["ref"])
            print(f"{length:>6} {name:>10} | {o:8.3f} {i:8.3f} {r:8.3f} {o / r:8.2f}", flush=True)


if __name__ == "__main__":
    main()
