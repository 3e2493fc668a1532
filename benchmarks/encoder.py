"""Encoder speed and memory: ours vs the reference (transformers pegasus_x), same machine, same run.

    python benchmarks/encoder.py                                   # full table (slow: minutes on 2 cores)
    python benchmarks/encoder.py --lengths 1024 4096 --dtypes fp32
    python benchmarks/encoder.py --lengths 32768 65536 --impls ours
    python benchmarks/encoder.py --train --lengths 4096 16384      # forward+backward, gradient checkpointing
    python benchmarks/encoder.py --dtypes fp32 --lengths 80 40,90,140,190,240,290,340,400 3000,8000


pegasus-x-base shape, random weights, batch 1; a length written ``A,B,...`` is a right-padded batch of those
lengths (ours encodes it as generation does, ``skip_padding=True``: the real tokens only). Every measurement runs
in a fresh subprocess so that its peak RSS is its own. Printed: wall time, achieved GFLOP/s and its share of this
machine's measured GEMM rate (the faster of torch's and the library's, FFN shape), peak RSS, and the ratios
ours/reference. `--check-bf16` also prints the relative
error of our bf16 encoder output against our fp32 output on the same weights (and the reference's bf16 against its
fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def encoder_flops(cfg, T: int) -> float:
    """Multiply-adds ×2 of one encoder pass over T real tokens: projections, FFN, block-local and global
    attention (padding excluded: the useful work, whatever an implementation spends on padding)."""
    K, G, D, F = cfg.block_size, cfg.num_global_tokens, cfg.d_model, cfg.encoder_ffn_dim
    per_layer = 2 * (T + G) * (4 * D * D + 2 * D * F)            # q,k,v,out + fc1,fc2 on both streams
    per_layer += 2 * 2 * T * (G + min(K, T)) * D                 # token queries: scores + weighted values
    per_layer += 2 * 2 * G * (G + T) * D                         # global queries
    return per_layer * cfg.encoder_layers


def batch_lengths(spec: str) -> list[int]:
    """``"4096"`` → [4096]; ``"3000,8000"`` → a right-padded batch of those lengths."""
    return [int(n) for n in spec.split(",")]


def gemm_rate(dtype: torch.dtype, product) -> float:
    """Best-of-3 GFLOP/s of a (4096×768)·(768×3072) ``product(a, w)``: the shape of the encoder's FFN."""
    a, w = torch.randn(4096, 768, dtype=dtype), torch.randn(3072, 768, dtype=dtype)
    best = float("inf")
    with torch.no_grad():
        product(a, w)
        for _ in range(3):
            t = time.perf_counter()
            product(a, w)
            best = min(best, time.perf_counter() - t)
    return 2 * 4096 * 768 * 3072 / best / 1e9


def _build(impl: str, dtype: torch.dtype, train: bool):
    from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration

    cfg = PegasusXConfig.base(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(0)
    if impl == "ours":
        model = PegasusXForConditionalGeneration(cfg)
    else:
        from transformers import PegasusXConfig as RefConfig
        from transformers import PegasusXForConditionalGeneration as RefModel

        model = RefModel(RefConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"}))
    model = model.to(dtype)
    model.train(train)
    if train:
        model.gradient_checkpointing_enable()
    return cfg, model


def worker(impl: str, dtype_name: str, lengths: list[int], train: bool, repeats: int) -> dict:
    """One measurement in this process; returns seconds (best of ``repeats``) and peak RSS."""
    dtype = DTYPES[dtype_name]
    cfg, model = _build(impl, dtype, train)
    T = max(lengths)
    ids = torch.randint(2, cfg.vocab_size, (len(lengths), T), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask

    def run():
        if train:
            labels = torch.randint(2, cfg.vocab_size, (len(lengths), 64))
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)
            return None
        with torch.no_grad():
            if impl == "ours":
                return model.encode(ids, mask, skip_padding=True).last_hidden_state
            return model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    warm = ids[:1, : min(T, 1024)]
    with torch.no_grad():
        (model.encode(warm) if impl == "ours" else model.get_encoder()(input_ids=warm))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t)
    finite = True if out is None else bool(torch.isfinite(out).all())
    return {"seconds": best, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "finite": finite}


def bf16_error(T: int) -> dict:
    """Relative error ‖bf16 − fp32‖ / ‖fp32‖ of the encoder output, ours and the reference, same weights."""
    out = {}
    for impl in ("ours", "ref"):
        _, model = _build(impl, torch.float32, False)
        ids = torch.randint(2, 96103, (1, T), generator=torch.Generator().manual_seed(1))
        enc = (lambda m: m.encode(ids).last_hidden_state) if impl == "ours" else (
            lambda m: m.get_encoder()(input_ids=ids).last_hidden_state)
        with torch.no_grad():
            ref32 = enc(model).float()
            low = enc(model.to(torch.bfloat16)).float()
        out[impl] = ((low - ref32).norm() / ref32.norm()).item()
        del model
    return out


def _spawn(args: list[str]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", nargs="+", default=["1024", "4096", "16384"],
                   help="tokens per input; A,B,... is a right-padded batch of inputs of those lengths")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--impls", nargs="+", default=["ours", "ref"], choices=["ours", "ref"])
    p.add_argument("--train", action="store_true", help="forward+backward (whole model, 64 labels) with checkpointing")
    p.add_argument("--check-bf16", type=int, metavar="T", help="print bf16-vs-fp32 error at T tokens")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--worker", nargs=4, metavar=("IMPL", "DTYPE", "T", "TRAIN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        impl, dt, spec, train = args.worker
        lengths = batch_lengths(spec)
        repeats = 3 if sum(lengths) <= 4096 and train == "0" else 1
        print(json.dumps(worker(impl, dt, lengths, train == "1", repeats=repeats)))
        return
    if args.check_bf16:
        err = bf16_error(args.check_bf16)
        print(f"bf16 vs fp32 relative error at {args.check_bf16} tokens: ours {err['ours']:.2e}, "
              f"reference {err['ref']:.2e} (bar: ours ≤ 2e-2)")
        return
    from pegasus_x import PegasusXConfig
    from pegasus_x.native.linear import linear

    cfg = PegasusXConfig.base()
    # %GEMM: the share of the faster of torch's GEMM and the library's route for such products (px_gemm where the
    # CPU takes it), the rate the encoder's linears can reach here.
    torch_rates = {dt: gemm_rate(DTYPES[dt], torch.nn.functional.linear) for dt in args.dtypes}
    ours_rates = {dt: gemm_rate(DTYPES[dt], linear) for dt in args.dtypes}
    rates = {dt: max(torch_rates[dt], ours_rates[dt]) for dt in args.dtypes}
    print(f"machine GEMM rate ({args.threads} threads), torch / pegasus-x: "
          + ", ".join(f"{dt} {torch_rates[dt]:.0f} / {ours_rates[dt]:.0f} GFLOP/s" for dt in args.dtypes))
    mode = "forward+backward (checkpointing)" if args.train else "encoder forward"
    print(f"{mode}, pegasus-x-base shape, batch 1 (A,B,...: a right-padded batch; GFLOP/s of the real tokens' work)")
    print(f"{'tokens':>7} {'dtype':>5} {'impl':>5} {'seconds':>8} {'GFLOP/s':>8} {'%GEMM':>6} {'peak GB':>8}"
          f" {'time ours/ref':>13} {'RSS ours/ref':>12}")
    for T in args.lengths:
        for dt in args.dtypes:
            res = {impl: _spawn(["--worker", impl, dt, T, "1" if args.train else "0",
                                 "--threads", str(args.threads)]) for impl in args.impls}
            for impl, r in res.items():
                if "error" in r:
                    print(f"{T:>7} {dt:>5} {impl:>5} failed: {r['error']}")
                    continue
                flops = sum(encoder_flops(cfg, n) for n in batch_lengths(T))
                gf = flops / r["seconds"] / 1e9 * (3 if args.train else 1)
                ratio = ""
                if impl == "ours" and "ref" in res and "error" not in res["ref"]:
                    ratio = (f"{r['seconds'] / res['ref']['seconds']:>13.2f}"
                             f" {r['rss_gb'] / res['ref']['rss_gb']:>12.2f}")
                flag = "" if r["finite"] else "  (NaN/inf in output!)"
                print(f"{T:>7} {dt:>5} {impl:>5} {r['seconds']:>8.2f} {gf:>8.1f} {100 * gf / rates[dt]:>5.0f}%"
                      f" {r['rss_gb']:>8.2f}{ratio}{flag}", flush=True)


if __name__ == "__main__":
    main()
