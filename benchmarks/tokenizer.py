"""Batch-encoding speed: pegasus_x.PegasusTokenizer vs the transformers fast tokenizer, same run.

Usage::

    PYTHONPATH=src python benchmarks/tokenizer.py [--docs 64] [--chars 50000] [--repeat 3] [--folder DIR]

Prints best-of-``repeat`` wall times and the ours / reference ratio (below 1 means we are faster)
for several call shapes. Both tokenizers run the same Rust Unigram model with the same thread pool,
so the difference is the Python-side work around it.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from pegasus_x.tokenizer import PegasusTokenizer

DEFAULT_FOLDER = Path(__file__).resolve().parents[1] / "src" / "pegasus_x" / "assets" / "pegasus-tokenizer"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no will more can "
         "government market analysts said percent economy court ruling summary document research results "
         "patients treatment model training data significant increase decrease 2023 1.5 million $40 "
         "résumé naïve café Москва 東京 مرحبا").split()


def make_documents(count: int, chars: int, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English documents of about ``chars`` characters, with paragraphs."""
    rng = random.Random(seed)
    docs = []
    for _ in range(count):
        parts, size = [], 0
        while size < chars:
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30)))
            sentence = sentence[0].upper() + sentence[1:] + rng.choice([". ", ". ", "? ", "! ", ".\n\n"])
            parts.append(sentence)
            size += len(sentence)
        docs.append("".join(parts)[:chars].strip())
    return docs


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up: thread pool start, first allocations
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=64)
    parser.add_argument("--chars", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    args = parser.parse_args()

    import transformers

    ours = PegasusTokenizer.from_pretrained(args.folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(args.folder))
    docs = make_documents(args.docs, args.chars)
    shapes = {
        "lists, no padding": dict(),
        "pt, pad longest": dict(padding=True, return_tensors="pt"),
        "pt, truncate 16384 + pad": dict(padding=True, truncation=True, max_length=16384, return_tensors="pt"),
    }
    tokens = sum(len(ids) for ids in ours(docs)["input_ids"])
    print(f"{args.docs} documents x {args.chars:,} chars = {tokens:,} tokens; best of {args.repeat}")
    print(f"{'call':<28}{'ours (s)':>10}{'reference (s)':>15}{'ratio':>8}")
    for name, kwargs in shapes.items():
        mine = ours(docs, **kwargs)["input_ids"]
        theirs = reference(docs, **kwargs)["input_ids"]
        if (mine.tolist() if hasattr(mine, "tolist") else mine) != (
                theirs.tolist() if hasattr(theirs, "tolist") else theirs):
            raise SystemExit(f"ids differ from the reference for {name!r}")
        t_ours = best_of(lambda kw=kwargs: ours(docs, **kw), args.repeat)
        t_ref = best_of(lambda kw=kwargs: reference(docs, **kw), args.repeat)
        print(f"{name:<28}{t_ours:>10.3f}{t_ref:>15.3f}{t_ours / t_ref:>8.2f}")


if __name__ == "__main__":
    main()
