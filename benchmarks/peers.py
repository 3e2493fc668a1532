"""Decode speed against CTranslate2, the usual fast seq2seq engine on CPUs, at the pegasus-x-base decoder shape.

    python benchmarks/peers.py --setup            # once: creates .bench/ct2-venv (see CT2_VENV below)
    python benchmarks/peers.py                    # 1,024 and 4,096 tokens, greedy and beam 4, every configuration
    python benchmarks/peers.py --lengths 1024 --modes greedy --configs ours-fp32 ours-int8 ct2-int8

CTranslate2 cannot run PEGASUS-X, but it runs PEGASUS, whose decoder is ours: pre-LN layers of self-attention,
cross-attention and a ReLU feed-forward, sinusoidal positions, an LM head tied to the embedding. Both sides get that
decoder at pegasus-x-base size (12 layers x 768, 12 heads, FFN 3,072, vocabulary 96,103) with random weights, and
the same random input of the given length. The encoder is left out of the measure, so both get one encoder layer
(its output only has to have the input's length): ms per decode step = (time to generate N tokens - time to
generate 1 token) / (N - 1), every token forced (min length = max length). Also reported: first-token latency (the
1-token run: encoder + prefill + one step), the load time (ours: ``from_pretrained``, for int8 with quantizing at
load; CTranslate2: its ``Translator``), the RSS once loaded, the peak RSS up to then (the load's) and the peak RSS of
the whole process. Our model is saved once
under ``.bench/`` and loaded with ``from_pretrained`` as users load it (weights in 2 MB pages; int8: quantized at
load).

Configurations: CTranslate2 ``float32`` and ``int8`` (its weight and activation int8), ours ``fp32``, ``bf16`` and
``int8`` (pegasus_x.quantize: int8 decoder and LM-head weights, fp32 activations), ``int8-bf16kv`` (the same
with the cross-attention keys/values kept in bf16: ``quantize.set_kv_dtype(model, "bf16")``) and ``int8-int8kv``
(in int8 with row scales: ``set_kv_dtype(model, "int8")``). Each configuration
runs in a fresh process, which warms up, then times the 1-token and N-token runs ``--repeats`` times alternately,
each after the same untimed 1-token run
(medians kept); configurations are interleaved, so a shared machine's drift hits them alike. The table names the CPU
and its ISA (AVX2 / AVX512 / AVX512-BF16 / AMX / VNNI); the raw results go to ``benchmarks/results/peers-<cpu>.json``.

CT2_VENV: CTranslate2's converter needs transformers 4.x and torch, kept apart from the project's environment:
``python3 -m venv .bench/ct2-venv && .bench/ct2-venv/bin/pip install ctranslate2 "transformers==4.57.*"
torch==2.13.0 sentencepiece`` (what ``--setup`` runs). Its ``PegasusConfig`` needs ``normalize_before=True,
normalize_embedding=False, scale_embedding=True`` to be the pre-LN PEGASUS decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ISA_FLAGS, cpu_info

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / ".bench"
CT2_VENV = BENCH / "ct2-venv"
CT2_PACKAGES = ["ctranslate2", "transformers==4.57.*", "torch==2.13.0", "sentencepiece"]
TOKENIZER = ROOT / "src" / "pegasus_x" / "assets" / "pegasus-tokenizer"   # the converter reads the vocabulary here
SHAPE = dict(vocab=96103, d_model=768, heads=12, decoder_layers=12, ffn=3072, encoder_layers=1)
MODES = {"greedy": 1, "beam4": 4}
CONFIGS = ("ct2-float32", "ct2-int8", "ours-fp32", "ours-bf16", "ours-int8", "ours-int8-bf16kv", "ours-int8-int8kv")
# ---------------------------------------------------------------------------------------------------- children
def peak_rss_mb() -> float:
    """The process's peak resident memory so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The process's resident memory now (VmRSS), MB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:")), 0.0)
    except OSError:
        return 0.0


def _timed(generate, repeats: int, new_tokens: int) -> dict:
    """Medians of the 1-token and N-token runs (alternating), and the per-step time they give: by the wall clock,
    and by the process's CPU time (``*_cpu``: what a run would take with its cores to itself; only meaningful for
    one thread, where no thread waits for another)."""
    generate(2)                                                             # warm-up: kernels built, pages touched
    runs = {(n, clock): [] for n in (1, new_tokens) for clock in ("wall", "cpu")}
    for _ in range(repeats):
        for n in (1, new_tokens):
            # Every timed run follows the same untimed 1-token run: the encoder's time depends on what ran just
            # before (it was faster right after an N-token run than right after a 1-token run), and plain
            # alternation would charge that difference to the N - 1 steps.
            generate(1)
            wall, cpu = time.perf_counter(), time.process_time()
            generate(n)
            runs[n, "wall"].append(time.perf_counter() - wall)
            runs[n, "cpu"].append(time.process_time() - cpu)
    out = dict(one_token_s=runs[1, "wall"], n_tokens_s=runs[new_tokens, "wall"],
               one_token_cpu_s=runs[1, "cpu"], n_tokens_cpu_s=runs[new_tokens, "cpu"])
    for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
        first, full = statistics.median(runs[1, clock]), statistics.median(runs[new_tokens, clock])
        out[f"ms_per_step{suffix}"] = 1000 * (full - first) / (new_tokens - 1)
        out[f"first_token_ms{suffix}"] = 1000 * first
    return out


def save_ours(folder: Path) -> None:
    """A random pegasus-x-base model with one encoder layer, saved once: children load it as users do
    (``from_pretrained``: weights in 2 MB pages, quantized at load for int8)."""
    import torch

    from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration

    torch.manual_seed(0)
    cfg = PegasusXConfig.base()
    cfg.encoder_layers = SHAPE["encoder_layers"]
    PegasusXForConditionalGeneration(cfg).save_pretrained(folder)


def child_ours(spec: dict) -> dict:
    """Ours on the saved random pegasus-x-base-shaped model."""
    import torch

    from pegasus_x import PegasusXForConditionalGeneration
    from pegasus_x.quantize import set_kv_dtype

    torch.set_num_threads(spec["threads"])
    kind = spec["config"].split("-", 1)[1]
    wall, cpu = time.perf_counter(), time.process_time()
    model = PegasusXForConditionalGeneration.from_pretrained(
        spec["ours_model"], dtype="bf16" if kind == "bf16" else "fp32",
        quantize="int8" if kind.startswith("int8") else None)
    loaded = dict(load_s=time.perf_counter() - wall, load_cpu_s=time.process_time() - cpu, loaded_rss_mb=rss_mb(),
                  load_peak_rss_mb=peak_rss_mb())
    if kind.endswith("kv"):
        set_kv_dtype(model, kind[len("int8-"):-len("kv")])
    ids = torch.tensor([spec["ids"]])
    beams = MODES[spec["mode"]]

    def generate(n: int) -> None:
        with torch.no_grad():
            out = model.generate(ids, num_beams=beams, max_new_tokens=n, min_new_tokens=n, length_penalty=1.0)
        assert out.shape[1] == n + 1, out.shape

    return loaded | _timed(generate, spec["repeats"], spec["new_tokens"])


def child_ct2(spec: dict) -> dict:
    """CTranslate2 on the converted random PEGASUS model."""
    import ctranslate2

    kind = spec["config"].split("-", 1)[1]
    wall, cpu = time.perf_counter(), time.process_time()
    translator = ctranslate2.Translator(str(spec["ct2_model"]), device="cpu", compute_type=kind,
                                        intra_threads=spec["threads"], inter_threads=1)
    loaded = dict(load_s=time.perf_counter() - wall, load_cpu_s=time.process_time() - cpu, loaded_rss_mb=rss_mb(),
                  load_peak_rss_mb=peak_rss_mb())
    vocab = json.loads((Path(spec["ct2_model"]) / "shared_vocabulary.json").read_text())
    source = [vocab[i] for i in spec["ids"][:-1]] + ["</s>"]
    beams = MODES[spec["mode"]]

    def generate(n: int) -> None:
        # max_input_length=0: CTranslate2 otherwise cuts every source at 1,024 tokens (its default).
        out = translator.translate_batch([source], beam_size=beams, max_decoding_length=n, min_decoding_length=n,
                                         length_penalty=1.0, max_input_length=0)
        assert len(out[0].hypotheses[0]) == n, len(out[0].hypotheses[0])

    return loaded | _timed(generate, spec["repeats"], spec["new_tokens"])


def convert_ct2(folder: Path, max_length: int) -> None:
    """(In the CT2 venv.) A random PEGASUS with our decoder shape, saved and converted to float32 and int8."""
    import shutil

    import ctranslate2
    import torch
    from transformers import PegasusConfig, PegasusForConditionalGeneration

    torch.manual_seed(0)
    cfg = PegasusConfig(vocab_size=SHAPE["vocab"], d_model=SHAPE["d_model"], encoder_layers=SHAPE["encoder_layers"],
                        decoder_layers=SHAPE["decoder_layers"], encoder_attention_heads=SHAPE["heads"],
                        decoder_attention_heads=SHAPE["heads"], encoder_ffn_dim=SHAPE["ffn"],
                        decoder_ffn_dim=SHAPE["ffn"], max_position_embeddings=max_length, activation_function="relu",
                        normalize_before=True, normalize_embedding=False, scale_embedding=True, pad_token_id=0,
                        eos_token_id=1, decoder_start_token_id=0)
    hf = folder / "hf"
    PegasusForConditionalGeneration(cfg).eval().save_pretrained(hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER / name, hf / name)
    for kind in ("float32", "int8"):
        ctranslate2.converters.TransformersConverter(str(hf)).convert(str(folder / kind), quantization=kind,
                                                                      force=True)
    shutil.rmtree(hf)


# ---------------------------------------------------------------------------------------------------- parent
def setup() -> None:
    """Create the CT2 venv (gitignored, under .bench/)."""
    subprocess.run([sys.executable, "-m", "venv", str(CT2_VENV)], check=True)
    subprocess.run([str(CT2_VENV / "bin" / "pip"), "install", *CT2_PACKAGES], check=True)


def run_child(python: Path, spec: dict, env: dict) -> dict:
    done = subprocess.run([str(python), __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{spec['config']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create .bench/ct2-venv and exit")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--new-tokens", type=int, default=32, help="N forced tokens per timed run (>= 2)")
    ap.add_argument("--repeats", type=int, default=3, help="1-token and N-token runs per process (medians kept)")
    ap.add_argument("--rounds", type=int, default=1, help="processes per configuration, interleaved")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/peers-<cpu>.json)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="what the table shows: wall-clock "
                    "time, or CPU time (for --threads 1 on a machine shared with other jobs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--convert", help=argparse.SUPPRESS)
    ap.add_argument("--save-ours", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = (child_ct2 if spec["config"].startswith("ct2") else child_ours)(spec)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return
    if args.save_ours:
        save_ours(Path(args.save_ours))
        return
    if args.convert:
        folder, max_length = args.convert.split(":")
        convert_ct2(Path(folder), int(max_length))
        return
    if args.setup:
        setup()
        return
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2")

    name, isa = cpu_info()
    print(f"CPU: {name}; ISA: {' '.join(isa) or 'none of ' + ', '.join(ISA_FLAGS.values())}; "
          f"threads {args.threads}", flush=True)
    ct2_python = CT2_VENV / "bin" / "python"
    if any(c.startswith("ct2") for c in args.configs):
        if not ct2_python.exists():
            raise SystemExit(f"no CTranslate2 environment at {CT2_VENV}: run `python {__file__} --setup` first")
        max_length = max(args.lengths) + args.new_tokens + 8
        ct2_models = BENCH / f"ct2-pegasus-{max_length}"
        if not (ct2_models / "int8" / "model.bin").exists():
            print(f"converting a random PEGASUS into {ct2_models} ...", flush=True)
            subprocess.run([str(ct2_python), __file__, "--convert", f"{ct2_models}:{max_length}"], check=True)

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ours_model = BENCH / "ours-base-1-encoder-layer"
    if any(c.startswith("ours") for c in args.configs) and not (ours_model / "model.safetensors").exists():
        print(f"saving a random pegasus-x-base into {ours_model} ...", flush=True)
        subprocess.run([sys.executable, __file__, "--save-ours", str(ours_model)], check=True, env=env)
    import random

    rng = random.Random(0)
    results = []
    for length in args.lengths:
        ids = [rng.randrange(200, SHAPE["vocab"] - 1) for _ in range(length - 1)] + [1]
        for mode in args.modes:
            for round_ in range(args.rounds):
                for config in args.configs if round_ % 2 == 0 else args.configs[::-1]:
                    spec = dict(config=config, mode=mode, length=length, ids=ids, new_tokens=args.new_tokens,
                                repeats=args.repeats, threads=args.threads, ours_model=str(ours_model),
                                ct2_model=str(ct2_models / config.split("-", 1)[1]) if config.startswith("ct2")
                                else None)
                    out = run_child(ct2_python if config.startswith("ct2") else Path(sys.executable), spec, env)
                    out.update(config=config, mode=mode, length=length, round=round_)
                    results.append(out)
                    print(f"{length:>6} {mode:<7} {config:<12} {out['ms_per_step']:8.2f} ms/step "
                          f"({out['ms_per_step_cpu']:.2f} CPU)  first token {out['first_token_ms']:6.0f} ms  "
                          f"load {out['load_s']:5.2f} s  RSS loaded {out['loaded_rss_mb']:6.0f} MB, peak "
                          f"loading {out['load_peak_rss_mb']:6.0f} MB, overall {out['peak_rss_mb']:6.0f} MB",
                          flush=True)
    table = summarize(results, args)
    print(f"\nCPU: {name}; ISA: {' '.join(isa)}\n" + table)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"peers-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(cpu=name, isa=isa, threads=args.threads, clock=args.clock,
                                   new_tokens=args.new_tokens,
                                   repeats=args.repeats, shape=SHAPE, results=results, table=table), indent=1) + "\n")
    print(f"wrote {out}")


def summarize(results: list[dict], args) -> str:
    """Markdown: ms/step (median over rounds) per configuration, then the bar's ratios."""
    suffix = "_cpu" if args.clock == "cpu" else ""

    def med(length, mode, config, key="ms_per_step"):
        key = {"ms_per_step": key + suffix, "first_token_ms": key + suffix, "load_s": f"load{suffix}_s"}.get(key, key)
        vals = [r[key] for r in results if (r["length"], r["mode"], r["config"]) == (length, mode, config)]
        return statistics.median(vals) if vals else None

    lines = [f"ms per decode step ({args.clock} clock, {args.threads} thread(s)):", "",
             "| tokens | mode | " + " | ".join(args.configs) + " | int8/ct2-int8 | int8/ours-fp32"
             " | int8-bf16kv/ct2-int8 | int8-bf16kv/ours-fp32 | int8-int8kv/ct2-int8 | int8-int8kv/ours-fp32"
             " | fp32/ct2-fp32 |",
             "|---:|---|" + "---:|" * (len(args.configs) + 7)]
    for length in args.lengths:
        for mode in args.modes:
            cells = [med(length, mode, c) for c in args.configs]

            def ratio(a, b):
                x, y = med(length, mode, a), med(length, mode, b)
                return f"{x / y:.2f}" if x and y else "–"
            lines.append(f"| {length:,} | {mode} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells)
                         + f" | {ratio('ours-int8', 'ct2-int8')} | {ratio('ours-int8', 'ours-fp32')} | "
                         f"{ratio('ours-int8-bf16kv', 'ct2-int8')} | {ratio('ours-int8-bf16kv', 'ours-fp32')} | "
                         f"{ratio('ours-int8-int8kv', 'ct2-int8')} | {ratio('ours-int8-int8kv', 'ours-fp32')} | "
                         f"{ratio('ours-fp32', 'ct2-float32')} |")
    lines += ["", f"load (ours: from_pretrained, int8 quantizing at load; CT2: Translator) and first token "
              f"({args.clock} clock), RSS once loaded, peak RSS while loading and overall (medians over rounds):", "",
              "| tokens | mode | configuration | load s | first token ms | RSS loaded MB | peak RSS loading MB "
              "| peak RSS MB |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for length in args.lengths:
        for mode in args.modes:
            for c in args.configs:
                if med(length, mode, c) is not None:
                    lines.append(f"| {length:,} | {mode} | {c} | {med(length, mode, c, 'load_s'):.2f} | "
                                 f"{med(length, mode, c, 'first_token_ms'):.0f} | "
                                 f"{med(length, mode, c, 'loaded_rss_mb'):.0f} | "
                                 f"{med(length, mode, c, 'load_peak_rss_mb'):.0f} | "
                                 f"{med(length, mode, c, 'peak_rss_mb'):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
