"""What int8 weights (pegasus_x.quantize) cost in accuracy, how long quantizing at load takes, and how far bf16 is.

    python benchmarks/int8_accuracy.py                      # both parts
    python benchmarks/int8_accuracy.py --skip-demo          # random base weights only

1. Random pegasus-x-base weights (one encoder layer: the encoder is not quantized, so its depth changes nothing
   here), a random 1,024-token input, 64 teacher-forced decoder tokens: for every decoder position the relative
   error of the int8 logits row, ||int8 - fp32|| / ||fp32||, and whether its argmax (top-1) is fp32's. Random
   weights are a hard case: their logits are nearly flat, so top-1 flips on tiny differences. The model is saved
   and loaded as users load it: ``from_pretrained`` in fp32, then with ``quantize="int8"`` (every decoder linear and
   the LM head quantized as read), timed ``--load-repeats`` times each, alternately, after an untimed load that
   puts the file in the page cache and pays a process's first-load costs (medians kept). Also the same error for
   the model loaded in bf16 (``dtype="bf16"``) against the fp32 logits: what ``--dtype auto`` requires of bf16
   before choosing it (within 1e-2, ``devices.auto_dtype``). And the int8 model's logits through generation's
   decoder cache (one pass over the 64 positions) with its cross-attention keys/values in fp32, bf16 and int8
   (``quantize.set_kv_dtype``), against the same fp32 logits.
2. The bundled demo model on its held-out test pages (examples/manpages: the pages of this machine's man pages that
   prepare.py's hash puts in the test split, rendered the same way, so never seen in training; how many depends on
   the man pages installed; inputs cut at 256 tokens as trained): ROUGE
   of fp32, of int8 and of int8 with int8 cross keys/values with the checkpoint's generation options (beam 4), and
   how many pages get the same tokens from them as from fp32, greedy and beam 4.

Native kernels on (the path users run); ``PEGASUS_X_NATIVE=0`` measures the torch reference instead.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def random_weights(length: int, tokens: int, load_repeats: int) -> dict:
    from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration

    torch.manual_seed(0)
    cfg = PegasusXConfig.base()
    cfg.encoder_layers = 1
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (1, length), generator=g)
    labels = torch.randint(3, cfg.vocab_size, (1, tokens), generator=g)

    def logits(folder: str, **options) -> torch.Tensor:
        with torch.no_grad():
            return PegasusXForConditionalGeneration.from_pretrained(folder, **options)(ids, labels=labels).logits[0]

    def cached_logits(folder: str, kv_dtype: str | None) -> torch.Tensor:
        """The int8 model's teacher-forced logits through generation's cache, cross keys/values in ``kv_dtype``."""
        from pegasus_x.cache import new_cache
        from pegasus_x.generate import make_step
        from pegasus_x.quantize import set_kv_dtype

        model = PegasusXForConditionalGeneration.from_pretrained(folder, dtype="fp32", quantize="int8")
        set_kv_dtype(model, kv_dtype)
        with torch.no_grad():
            states = model.encode(ids).last_hidden_state
            cache = new_cache(model, states, torch.ones_like(ids, dtype=torch.bool), 1, tokens)
            start = torch.full((1, 1), model.config.decoder_start_token_id)
            return make_step(model, cache)(torch.cat([start, labels[:, :-1]], 1), every=True)[0]

    seconds: dict[str | None, list[float]] = {None: [], "int8": []}
    with tempfile.TemporaryDirectory() as folder:
        PegasusXForConditionalGeneration(cfg).save_pretrained(folder)
        PegasusXForConditionalGeneration.from_pretrained(folder)          # untimed: page cache, first-load costs
        for _ in range(load_repeats):
            for quantize, times in seconds.items():
                start = time.perf_counter()
                PegasusXForConditionalGeneration.from_pretrained(folder, dtype="fp32", quantize=quantize)
                times.append(time.perf_counter() - start)
        exact = logits(folder, dtype="fp32")
        got = logits(folder, dtype="fp32", quantize="int8")
        bf16 = logits(folder, dtype="bf16").float()
        cached = {kv: cached_logits(folder, kv) for kv in (None, "bf16", "int8")}

    def rel_errors(x: torch.Tensor) -> list[float]:
        return sorted(((x - exact).norm(dim=-1) / exact.norm(dim=-1)).tolist())

    def agreement(x: torch.Tensor) -> float:
        return (x.argmax(-1) == exact.argmax(-1)).float().mean().item()

    rel, bf16_rel = rel_errors(got), rel_errors(bf16)
    kv = {f"int8_kv_{name or 'fp32'}": dict(rel_error_median=r[len(r) // 2], rel_error_max=r[-1],
                                          top1_agreement=agreement(x))
          for name, x in cached.items() for r in [rel_errors(x)]}
    return dict(positions=tokens, rel_error_median=rel[len(rel) // 2], rel_error_max=rel[-1],
                top1_agreement=agreement(got), fp32_load_seconds=statistics.median(seconds[None]),
                int8_load_seconds=statistics.median(seconds["int8"]),
                bf16_rel_error_median=bf16_rel[len(rel) // 2], bf16_rel_error_max=bf16_rel[-1], cached=kv)


def _prepare_module():
    spec = importlib.util.spec_from_file_location("prepare", ROOT / "examples" / "manpages" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pages(man_root: Path) -> list[dict]:
    """The test split of examples/manpages/prepare.py, rendering only the pages its hash puts there."""
    prepare = _prepare_module()
    files = [p for p in prepare.page_files(man_root) if prepare.split_of(p.name) == "test"]
    seen, pages = set(), []
    for path in files:
        example = prepare.to_example(path)
        if example is None:
            continue
        key = hashlib.sha256(example["source"].encode()).hexdigest()
        if key not in seen:                                 # .so aliases render to the same page
            seen.add(key)
            pages.append(example)
    return pages


def demo(pages: list[dict], max_input_tokens: int) -> dict:
    from pegasus_x import Summarizer
    from pegasus_x.metrics import rouge_scores
    from pegasus_x.quantize import set_kv_dtype

    sources, targets = [p["source"] for p in pages], [p["target"] for p in pages]
    out = dict(pages=len(pages))
    for name, quantize, kv_dtype in (("fp32", None, None), ("int8", "int8", None), ("int8-kv8", "int8", "int8")):
        summarizer = Summarizer(None, dtype="fp32", device="cpu", quantize=quantize,
                                max_input_tokens=max_input_tokens)
        set_kv_dtype(summarizer.model, kv_dtype)
        for mode, options in (("beam4", {}), ("greedy", dict(num_beams=1))):
            start = time.perf_counter()
            with warnings.catch_warnings():                     # one "input truncated" note per long page
                warnings.simplefilter("ignore", UserWarning)
                texts = summarizer(sources, **options)
            out[f"{name}_{mode}_seconds"] = time.perf_counter() - start
            out[f"{name}_{mode}_rouge"] = rouge_scores(texts, targets)
            out[f"{name}_{mode}_texts"] = texts
    for mode in ("beam4", "greedy"):
        for name in ("int8", "int8-kv8"):
            same = sum(a == b for a, b in zip(out[f"fp32_{mode}_texts"], out[f"{name}_{mode}_texts"]))
            out[f"identical_{name}_{mode}"] = same / len(pages)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--man-root", type=Path, default=Path("/usr/share/man"))
    ap.add_argument("--max-input-tokens", type=int, default=256)
    ap.add_argument("--load-repeats", type=int, default=3, help="timed loads of each kind (medians kept)")
    ap.add_argument("--threads", type=int, help="torch threads (default torch's; 1 on a machine shared with other "
                    "jobs, where threads waiting on each other make times swing)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    if args.load_repeats < 1:
        ap.error("--load-repeats must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    results = dict(random_base=random_weights(args.length, args.tokens, args.load_repeats))
    r = results["random_base"]
    print(f"{torch.get_num_threads()} thread(s); random base weights, {args.length} input tokens, {r['positions']} teacher-forced positions: relative "
          f"logit error median {r['rel_error_median']:.4f}, max {r['rel_error_max']:.4f}; top-1 agreement "
          f"{100 * r['top1_agreement']:.1f}%; load {r['fp32_load_seconds']:.2f} s in fp32, "
          f"{r['int8_load_seconds']:.2f} s quantizing to int8; bf16 (not int8) against fp32: median "
          f"{r['bf16_rel_error_median']:.4f}, max {r['bf16_rel_error_max']:.4f}", flush=True)
    for name, c in r["cached"].items():
        print(f"  int8 weights through the decoder cache, {name.rsplit('_', 1)[1]} cross keys/values: relative logit "
              f"error median {c['rel_error_median']:.5f}, max {c['rel_error_max']:.5f}; top-1 agreement "
              f"{100 * c['top1_agreement']:.1f}%", flush=True)
    if not args.skip_demo:
        pages = test_pages(args.man_root)
        if not pages:
            sys.exit(f"no test-split manual pages under {args.man_root}: apt-get install -y man-db manpages "
                     "manpages-dev, or --skip-demo")
        d = results["demo"] = demo(pages, args.max_input_tokens)
        print(f"demo model, {d['pages']} held-out pages, inputs cut at {args.max_input_tokens} tokens:")
        print("| | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | same text as fp32 |")
        print("|---|---:|---:|---:|---:|---:|")
        for mode in ("beam4", "greedy"):
            for name in ("fp32", "int8", "int8-kv8"):
                s = d[f"{name}_{mode}_rouge"]
                same = f"{100 * d[f'identical_{name}_{mode}']:.1f}%" if name != "fp32" else "–"
                print(f"| {name} {mode} | {s['rouge1']:.2f} | {s['rouge2']:.2f} | {s['rougeL']:.2f} | "
                      f"{s['rougeLsum']:.2f} | {same} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
