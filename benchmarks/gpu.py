"""One prepared GPU check: encoder and beam search, ours vs the reference, on a CUDA device.

    PYTHONPATH=src python benchmarks/gpu.py [--sections parity encoder generate] [--out results.json]
    PYTHONPATH=src python benchmarks/gpu.py --device cpu --tokens 1024 --new-tokens 4   # smoke test, no GPU

pegasus-x-base shape, random weights shared by both implementations, batch 1:
1. parity on CUDA (tiny config, fp32): max |Δ| of logits, SDPA path vs reference eager;
2. encoder forward at 16,384 tokens, fp32 and bf16: time (best of 3) and peak GPU memory, ours/reference;
   ours alone at 32,768 and 65,536 tokens in bf16;
3. bf16 encoder output vs fp32 (relative error), ours and reference;
4. beam 4 (bf16) and greedy (fp32) at 16,384 tokens, 128 new tokens forced: time and peak memory, ours/reference,
   and whether the tokens are the same.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch



DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats: int = 3):
    """Best wall time of `repeats` calls (the first one warms up), peak device memory in GiB (0 on CPU), output."""
    _sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    return best, peak, out


def _pair(dtype):
    from transformers import PegasusXConfig as RefConfig
    from transformers import PegasusXForConditionalGeneration as RefModel

    from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration

    cfg = PegasusXConfig.base(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    torch.manual_seed(0)
    ours = PegasusXForConditionalGeneration(cfg).eval()
    ref = RefModel(RefConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})).eval()
    ref.load_state_dict(ours.state_dict())
    return cfg, ours.to(DEVICE, dtype), ref.to(DEVICE, dtype)


def parity() -> dict:
    from twin import random_batch, reference_twin  # benchmarks/twin.py (the script's folder)

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        ref, ours, _ = reference_twin(Path(tmp))
        ref, ours = ref.to(DEVICE), ours.to(DEVICE)
        ids, mask, dec = (t.to(DEVICE) for t in random_batch([28, 5, 9], 96, seed=1))
        with torch.no_grad():
            r = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            o = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    return {"parity_max_abs_diff_fp32": (o - r).abs().max().item()}


def encoder(results: dict, T: int) -> None:
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        cfg, ours, ref = _pair(dtype)
        ids = torch.randint(2, cfg.vocab_size, (1, T), device=DEVICE)
        with torch.no_grad():
            t_o, m_o, out_o = _timed(lambda: ours.encode(ids).last_hidden_state)
            t_r, m_r, out_r = _timed(lambda: ref.get_encoder()(input_ids=ids).last_hidden_state)
        results[f"encoder_{T}_{name}"] = {"ours_s": t_o, "ref_s": t_r, "time_ratio": t_o / t_r,
                                          "ours_peak_gb": m_o, "ref_peak_gb": m_r, "mem_ratio": m_o / m_r if m_r else None}
        results[f"encoder_out_{name}"] = (out_o.float().cpu(), out_r.float().cpu())
        print(name, results[f"encoder_{T}_{name}"], flush=True)
        if name == "bf16":
            for long in (2 * T, 4 * T):
                ids_l = torch.randint(2, cfg.vocab_size, (1, long), device=DEVICE)
                with torch.no_grad():
                    t, m, out = _timed(lambda: ours.encode(ids_l).last_hidden_state, repeats=2)
                results[f"encoder_{long}_bf16_ours"] = {"s": t, "peak_gb": m, "finite": bool(torch.isfinite(out).all())}
                print(long, results[f"encoder_{long}_bf16_ours"], flush=True)
        ours = ref = None                    # free the GPU memory before the next dtype
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    (o32, r32), (o16, r16) = results.pop("encoder_out_fp32"), results.pop("encoder_out_bf16")
    results["bf16_rel_err_ours"] = ((o16 - o32).norm() / o32.norm()).item()
    results["bf16_rel_err_ref"] = ((r16 - r32).norm() / r32.norm()).item()
    print("bf16 rel err", results["bf16_rel_err_ours"], results["bf16_rel_err_ref"], flush=True)


def generate(results: dict, T: int, new: int) -> None:
    """Beam 4 in bf16 and greedy in fp32 (where the two implementations should pick the same tokens)."""
    for mode, dtype, beams in (("beam4", torch.bfloat16, 4), ("greedy", torch.float32, 1)):
        cfg, ours, ref = _pair(dtype)
        ids = torch.randint(2, cfg.vocab_size, (1, T), device=DEVICE)
        kw = dict(num_beams=beams, min_new_tokens=new, max_new_tokens=new, length_penalty=0.8)
        with torch.no_grad():
            t_o, m_o, s_o = _timed(lambda: ours.generate(ids, **kw), repeats=2)
            t_r, m_r, s_r = _timed(lambda: ref.generate(input_ids=ids, do_sample=False, **kw), repeats=2)
        key = f"{mode}_{T}_{'bf16' if dtype == torch.bfloat16 else 'fp32'}"
        results[key] = {"ours_s": t_o, "ref_s": t_r, "speedup": t_r / t_o, "ours_peak_gb": m_o,
                        "ref_peak_gb": m_r, "mem_ratio": m_o / m_r if m_r else None,
                        "same_tokens": s_o.shape == s_r.shape and bool((s_o == s_r).all())}
        print(key, results[key], flush=True)
        ours = ref = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", choices=["parity", "encoder", "generate"],
                   default=["parity", "encoder", "generate"])
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a quick smoke test of this script")
    p.add_argument("--tokens", type=int, default=16384, help="encoder input length (ours alone also runs 2x, 4x)")
    p.add_argument("--new-tokens", type=int, default=128, help="forced new tokens in the beam-search run")
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__}
    import transformers
    results["transformers"] = transformers.__version__
    sections = {"parity": lambda: results.update(parity()), "encoder": lambda: encoder(results, args.tokens),
                "generate": lambda: generate(results, args.tokens, args.new_tokens)}
    for section in (sections[name] for name in args.sections):
        try:            # one failing section must not cost the others their (expensive) device time
            section()
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            results.setdefault("errors", []).append(f"{type(exc).__name__}: {exc}")
            print("section failed:", repr(exc), flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
