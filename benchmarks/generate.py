"""Generation speed and memory: ours vs the reference (transformers ``generate``) at pegasus-x-base shape.

    python benchmarks/generate.py                                  # full matrix (slow on 2 cores)
    python benchmarks/generate.py --lengths 1024 4096 --modes greedy beam4 --dtypes fp32
    python benchmarks/generate.py --lengths 16384 --modes beam4 --ours-only
    python benchmarks/generate.py --lengths 1024 --modes beam4 --dtypes fp32 --batch 8      # 8 inputs per call
    CC=false python benchmarks/generate.py --lengths 1024 --ours-only             # ours without the C kernels
    PEGASUS_X_NATIVE=0 python benchmarks/generate.py --lengths 1024 --ours-only   # ours on the torch reference path

Random weights (``PegasusXConfig.base()``) are saved once in the Hugging Face layout; both implementations load that
same folder (eval mode, dropout off). Every configuration runs in a fresh subprocess so peak RSS
(``ru_maxrss``) is per run; each child first warms up on a short input, then generates exactly ``--new-tokens``
tokens (min = max) for ``--batch`` random inputs (default one) of the given length in one call. Per-step times
come from a forward hook on the decoder (one call per decoder step in both implementations); the first call marks
the end of encoder + prefill.

The floor: bytes of decoder + LM-head weights read per decode step ÷ measured memory bandwidth (the best of a large
``sum``, a large matrix-vector product, and half a large copy's traffic, measured right before and right after our
run of that row: the bandwidth of a shared machine drifts, and the floor must describe the same minutes). Also
printed: the stricter floor that adds the cross-attention K/V cache (read every step, once per input) and drops the
cross k/v projections (used once), once per input.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"greedy": 1, "beam4": 4}
DTYPES = ("fp32", "bf16")


# ---------------------------------------------------------------------------------------------------- child
def run_child(spec: dict) -> dict:
    """Load one implementation, warm up, time one generation; returns timings and peak memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[spec["dtype"]])
    if spec["impl"] == "ours":
        from pegasus_x import PegasusXForConditionalGeneration

        model = PegasusXForConditionalGeneration.from_pretrained(spec["weights"], dtype=dtype, device=device)
    else:
        from transformers import PegasusXForConditionalGeneration

        model = PegasusXForConditionalGeneration.from_pretrained(spec["weights"], dtype=dtype).to(device)
    model.eval()
    stamps: list[float] = []

    def stamp(*_):
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    model.get_decoder().register_forward_hook(stamp)
    beams, new = MODES[spec["mode"]], spec["new_tokens"]
    options = dict(num_beams=beams, max_new_tokens=new, min_new_tokens=new, do_sample=False, length_penalty=1.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, model.config.vocab_size, (spec["batch"], spec["length"]), generator=g).to(device)
    with torch.no_grad():
        model.generate(ids[:, :64], **{**options, "max_new_tokens": 2, "min_new_tokens": 2})     # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        stamps.clear()
        start = time.perf_counter()
        out = model.generate(ids, **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return dict(wall_s=wall, out_len=int(out.shape[1]), first_step_s=stamps[0] - start,
                ms_per_step=1e3 * statistics.median(steps), ms_per_step_mean=1e3 * statistics.mean(steps),
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                peak_gpu_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None)


def make_weights(spec: dict) -> dict:
    """Random pegasus-x-base weights (reference init) saved in the HF layout, with dropout off."""
    import torch

    from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration

    torch.manual_seed(0)
    config = PegasusXConfig.base(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    PegasusXForConditionalGeneration(config).save_pretrained(spec["weights"])
    return {}


def bandwidth_gbs(spec: dict) -> dict[str, float]:
    """Read bandwidth (GB/s) from a 1 GiB sum, a 1 GiB matrix-vector product, and a 1 GiB copy (bytes read)."""
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    n = 2 ** 28
    x = torch.rand(n, device=device)
    w, v = x.view(2 ** 14, 2 ** 14), torch.rand(2 ** 14, device=device)
    y = torch.empty_like(x)

    def best(fn) -> float:
        times = []
        for _ in range(5):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    gb = n * 4 / 1e9
    return {"sum": gb / best(x.sum), "mv": gb / best(lambda: torch.mv(w, v)), "copy": gb / best(lambda: y.copy_(x))}


# ---------------------------------------------------------------------------------------------------- parent
# The parent imports no torch and allocates nothing big: a child's ru_maxrss starts from its parent's RSS at fork.
BASE = dict(d_model=768, ffn=3072, layers=12, vocab=96103)       # PegasusXConfig.base()


def bytes_per_step(dtype: str, length: int, batch: int = 1) -> tuple[float, float]:
    """(decoder + LM-head weight bytes, the stricter per-step bytes) for pegasus-x-base and ``batch`` inputs."""
    d, f, layers, v = BASE["d_model"], BASE["ffn"], BASE["layers"], BASE["vocab"]
    layer = 8 * d * d + 2 * d * f + f + d + 3 * 2 * d            # attn (self+cross), FFN + biases, 3 LayerNorms
    weights = layers * layer + 2 * d + v * d                      # + final LayerNorm + LM head
    size = 4 if dtype == "fp32" else 2
    strict = weights - layers * 2 * d * d + batch * layers * 2 * length * d   # minus cross k/v proj, plus cross K/V
    return weights * size, strict * size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1, help="inputs per generate call (default: %(default)s)")
    parser.add_argument("--ours-only", action="store_true", help="skip the reference (it is slow at 16K)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--weights", type=Path, default=None, help="folder to keep the random weights in")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILDREN[spec["impl"]](spec)))
        return
    # Checked before any child starts: a bad size would otherwise fail in every child, one row at a time.
    if args.batch < 1 or args.new_tokens < 2 or min(args.lengths) < 1:
        parser.error("--batch and --lengths must be at least 1, --new-tokens at least 2 (a step is timed between two)")
    folder = args.weights or Path(tempfile.gettempdir()) / "pegasus-x-base-random"
    common = dict(device=args.device, threads=args.threads, weights=str(folder))
    if not (folder / "model.safetensors").is_file():
        _spawn({**common, "impl": "weights"})
    bw = _spawn({**common, "impl": "bandwidth"})
    print(f"device {args.device}, {args.threads} threads, {args.batch} input(s) per call; read bandwidth GB/s: "
          + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()) + f" (best {max(bw.values()):.1f})")
    print("Each row's floor uses the best bandwidth measured just before and just after its own run (this machine's "
          "bandwidth drifts by 30% over minutes).")
    rows = []
    header = (f"{'len':>6} {'mode':>6} {'dtype':>5} | {'ours s':>7} {'ref s':>7} {'speedup':>7} | {'ours GB':>7} "
              f"{'ref GB':>7} {'ratio':>5} | {'ours ms/step':>12} {'ref ms/step':>11} | {'GB/s':>5} {'floor ms':>8} "
              f"{'×floor':>6} {'strict floor':>12} {'×strict':>7}")
    print(header, flush=True)
    for length in args.lengths:
        for mode in args.modes:
            for dtype in args.dtypes:
                spec = dict(common, length=length, mode=mode, dtype=dtype, new_tokens=args.new_tokens, batch=args.batch)
                before = _spawn({**common, "impl": "bandwidth"})
                ours = _spawn({**spec, "impl": "ours"})
                after = _spawn({**common, "impl": "bandwidth"})
                ref = None if args.ours_only else _spawn({**spec, "impl": "reference"})
                best_bw = max(*before.values(), *after.values())
                weights, strict = bytes_per_step(dtype, length, args.batch)
                floor, strict_floor = 1e3 * weights / (best_bw * 1e9), 1e3 * strict / (best_bw * 1e9)
                row = dict(spec, ours=ours, reference=ref, bandwidth_gbs=best_bw, floor_ms=floor,
                           strict_floor_ms=strict_floor)
                rows.append(row)
                print(_format(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(bandwidth_gbs=bw, rows=rows), indent=1))


CHILDREN = {"ours": run_child, "reference": run_child, "weights": make_weights, "bandwidth": bandwidth_gbs}


def _spawn(spec: dict) -> dict | None:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  {spec['impl']} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _format(row: dict) -> str:
    o, r = row["ours"] or {}, row["reference"] or {}
    mem = "peak_gpu_gb" if row["device"] != "cpu" else "peak_rss_gb"

    def num(d: dict, key: str, fmt: str) -> str:
        return format(d[key], fmt) if d.get(key) is not None else "-"

    speed = f"{r['wall_s'] / o['wall_s']:.1f}×" if o and r else "-"
    ratio = f"{o[mem] / r[mem]:.2f}" if o and r else "-"
    times = (f"{num(o, 'ms_per_step', '.1f'):>12} {num(r, 'ms_per_step', '.1f'):>11} | "
             f"{row['bandwidth_gbs']:5.1f} {row['floor_ms']:8.1f} "
             + (f"{o['ms_per_step'] / row['floor_ms']:6.2f} {row['strict_floor_ms']:12.1f} "
                f"{o['ms_per_step'] / row['strict_floor_ms']:7.2f}" if o else ""))
    return (f"{row['length']:>6} {row['mode']:>6} {row['dtype']:>5} | {num(o, 'wall_s', '.1f'):>7} "
            f"{num(r, 'wall_s', '.1f'):>7} {speed:>7} | {num(o, mem, '.2f'):>7} {num(r, mem, '.2f'):>7} "
            f"{ratio:>5} | {times}")


if __name__ == "__main__":
    main()
