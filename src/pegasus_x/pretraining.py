"""Gap-sentence generation (GSG), PEGASUS' pretraining objective, and the ``pretrain`` command.

For one document (PEGASUS "Ind-Orig"):

1. split it into n sentences (:func:`pegasus_x.sentences.sentence_spans`, the package's one splitter);
2. score every sentence *independently* by ROUGE-1 F1 against the rest of the document, counting repeated words
   ("Orig", not unique-word sets), on lowercased ``[a-z0-9]+`` tokens without stemming — exactly what
   ``rouge-score`` computes with ``use_stemmer=False``;
3. draw a ratio uniformly from ``[min_ratio, max_ratio]`` (15–45% by default) and select the top
   ``m = round_half_up(ratio · n)`` sentences, clipped to ``[1, n − 1]`` so that something is predicted and
   something is left to read (ties: the earlier sentence wins);
4. replace each selected sentence by ``<mask_1>`` with probability 0.9 and leave it as is with probability 0.1;
5. target = the selected sentences in document order, joined by single spaces (the tokenizer adds ``</s>``).

Everything random comes from one ``random.Random``: a document's example depends only on the seed (for a corpus,
on the seed and the document's index), never on the processing order. Documents with fewer than two sentences
cannot make an example and are skipped (counted).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .errors import ConfigError, DataError
from .files import atomic_open, check_output, json_text
from .sentences import sentence_spans

MASK_SENTENCE = "<mask_1>"
# The training-data flag of the `train` subcommand that `pretrain` hands the GSG pairs to (columns source/target,
# the train command's default --source-column/--target-column).
TRAIN_DATA_FLAG = "--train"

_TOKEN = re.compile(r"[a-z0-9]+")


# ============================================================================================ scoring
def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokens without stemming: lowercase, runs of ``[a-z0-9]``, everything else separates."""
    return _TOKEN.findall(text.lower())


def rouge1_f1(prediction: str, reference: str) -> float:
    """ROUGE-1 F1 of two texts (clipped unigram counts), equal to ``rouge-score``'s with ``use_stemmer=False``."""
    return _f1(Counter(rouge_tokens(prediction)), Counter(rouge_tokens(reference)))


def _f1(pred: Counter, ref: Counter) -> float:
    overlap = sum(min(c, ref[w]) for w, c in pred.items())
    if overlap == 0:
        return 0.0
    # P = o/|pred|, R = o/|ref|  ⇒  F1 = 2PR/(P+R) = 2o/(|pred|+|ref|)
    return 2.0 * overlap / (sum(pred.values()) + sum(ref.values()))


def sentence_scores(sentences: Sequence[str]) -> list[float]:
    """ROUGE-1 F1 of each sentence against all the other sentences together (independent scoring).

    Linear in the document length: the rest's counts are the document's minus the sentence's.
    """
    counts = [Counter(rouge_tokens(s)) for s in sentences]
    total = sum(counts, Counter())
    return [_f1(c, total - c) for c in counts]


# ============================================================================================ GSG examples
@dataclass(frozen=True)
class GSGOptions:
    """Gap-sentence options: the ratio range of selected sentences and the masking probability.

    Raises:
        ConfigError: ratios outside (0, 1) or min > max; a probability outside [0, 1]; an empty mask token.
    """

    min_ratio: float = 0.15
    max_ratio: float = 0.45
    mask_prob: float = 0.9
    mask_token: str = MASK_SENTENCE

    def __post_init__(self) -> None:
        if not 0.0 < self.min_ratio <= self.max_ratio < 1.0:
            raise ConfigError(f"GSG ratios must satisfy 0 < min_ratio <= max_ratio < 1, got min_ratio="
                              f"{self.min_ratio}, max_ratio={self.max_ratio}")
        if not 0.0 <= self.mask_prob <= 1.0:
            raise ConfigError(f"mask_prob must be a probability in [0, 1], got {self.mask_prob}")
        if not self.mask_token:
            raise ConfigError("mask_token must be a non-empty string such as '<mask_1>'")


@dataclass
class GSGExample:
    """One pretraining pair.

    ``selected``: indices of the chosen sentences (ascending); ``masked``: those replaced by the mask token
    (a subset of ``selected``; the others were left in the source, PEGASUS' 10%).
    """

    source: str
    target: str
    selected: list[int]
    masked: list[int] = field(default_factory=list)


def num_selected(n: int, ratio: float) -> int:
    """``round_half_up(ratio · n)`` clipped to ``[1, n − 1]`` (n ≥ 2)."""
    return min(max(int(ratio * n + 0.5), 1), n - 1)


def select_sentences(scores: Sequence[float], m: int) -> list[int]:
    """Indices of the ``m`` best scores, ascending; on ties the earlier sentence wins."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:m])


def make_gsg_example(document: str, seed: int | random.Random, options: GSGOptions = GSGOptions()) -> GSGExample:
    """Build the GSG (source, target) pair of one document.

    Args:
        document: plain text; sentences are found by :func:`sentence_spans`.
        seed: an int (→ ``random.Random(seed)``) or a ``random.Random`` to draw from (ratio first, then one draw
            per selected sentence for masking).
        options: :class:`GSGOptions`.
    Returns:
        :class:`GSGExample`; the source keeps the document's own whitespace between sentences.
    Raises:
        DataError: fewer than two sentences (nothing could be both hidden and shown).
    """
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    spans = sentence_spans(document)
    if len(spans) < 2:
        raise DataError(f"a GSG example needs at least two sentences, the document has {len(spans)}: "
                        f"{document[:60]!r}")
    sentences = [document[a:b] for a, b in spans]
    ratio = rng.uniform(options.min_ratio, options.max_ratio)
    selected = select_sentences(sentence_scores(sentences), num_selected(len(sentences), ratio))
    masked = [i for i in selected if rng.random() < options.mask_prob]
    pieces, cursor = [], 0
    for i in masked:                      # rebuild the source, replacing only the masked spans
        a, b = spans[i]
        pieces += [document[cursor:a], options.mask_token]
        cursor = b
    pieces.append(document[cursor:])
    source = "".join(pieces).strip()
    target = " ".join(sentences[i] for i in selected)
    return GSGExample(source, target, selected, masked)


@dataclass
class GSGStats:
    """How many documents were read, how many became examples, how many were too short (< 2 sentences)."""

    documents: int
    examples: int
    skipped: int


def gsg_examples(documents: Iterable[str], seed: int, options: GSGOptions = GSGOptions()
                 ) -> Iterator[GSGExample | None]:
    """One example per document (``None`` when it has fewer than two sentences).

    Document i draws from ``random.Random(f"{seed}:{i}")``, so its example never depends on the other documents.
    """
    for i, doc in enumerate(documents):
        try:
            yield make_gsg_example(doc, random.Random(f"{seed}:{i}"), options)
        except DataError:
            yield None


def write_gsg_jsonl(documents: Iterable[str], path: str | os.PathLike, seed: int = 0,
                    options: GSGOptions = GSGOptions()) -> GSGStats:
    """Write one ``{"source", "target"}`` JSON line per usable document, atomically (temp file + rename).

    Raises:
        DataError: no document yields an example.
        InputError: ``path`` cannot be written (see :func:`pegasus_x.files.atomic_open`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = GSGStats(0, 0, 0)
    with atomic_open(path, "w", encoding="utf-8") as f:
        for example in gsg_examples(documents, seed, options):
            stats.documents += 1
            if example is None:
                stats.skipped += 1
                continue
            stats.examples += 1
            f.write(json_text({"source": example.source, "target": example.target}, "a GSG pair",
                              ensure_ascii=False) + "\n")
        if stats.examples == 0:        # raised inside the block: the temporary file is removed, nothing written
            raise DataError(f"none of the {stats.documents} documents has two or more sentences; GSG needs "
                            "multi-sentence documents")
    return stats


def read_documents(spec: str | os.PathLike, text_column: str = "text") -> list[str]:
    """Documents from a JSONL/JSON/CSV/TSV/Parquet file (or ``datasets`` name) with a text column.

    Raises:
        DataError: unreadable data, missing column, or no non-empty document.
    """
    from .training.data import load_pairs

    # A pair dataset whose source and target are the same column is the list of documents.
    return [example.source for example in load_pairs(spec, text_column, text_column).examples]


# ============================================================================================ CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``pretrain --data FILE [GSG options] [-- TRAIN OPTIONS]``; sets ``func(args) -> int``."""
    p = subparsers.add_parser(
        "pretrain", help="continued pretraining with gap-sentence generation on long documents",
        description="Build GSG (source, target) pairs from documents, then run the training loop on them. "
                    "Options after `--` go to the training loop unchanged, e.g. "
                    "`pegasus-x pretrain --data docs.jsonl -- --model ./pegasus-x --output-dir runs/pt --max-steps 1000`.")
    p.add_argument("--data", required=True, help="documents: .jsonl/.json/.csv/.tsv/.parquet or a datasets name")
    p.add_argument("--text-column", default="text", help="column holding the documents")
    defaults = GSGOptions()
    p.add_argument("--min-ratio", type=float, default=defaults.min_ratio, help="smallest share of sentences hidden")
    p.add_argument("--max-ratio", type=float, default=defaults.max_ratio, help="largest share of sentences hidden")
    p.add_argument("--mask-prob", type=float, default=defaults.mask_prob,
                   help="probability that a selected sentence is replaced by <mask_1> (else left in place)")
    p.add_argument("--gsg-seed", type=int, default=0, help="seed of the sentence masking")
    p.add_argument("--pairs-out", default=None,
                   help="keep the generated pairs in this JSONL file (default: a temporary file)")
    p.add_argument("train_args", nargs="*", metavar="-- TRAIN_OPTIONS", help="options for the training loop")
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> int:
    options = GSGOptions(args.min_ratio, args.max_ratio, args.mask_prob)
    if args.pairs_out:  # before reading: the pairs must not replace the documents they are made from
        check_output(args.pairs_out, [args.data], flag="--pairs-out", make_parents=True)
    documents = read_documents(args.data, args.text_column)
    with tempfile.TemporaryDirectory(prefix="pegasus-x-gsg-") as tmp:
        pairs = Path(args.pairs_out) if args.pairs_out else Path(tmp) / "gsg.jsonl"
        stats = write_gsg_jsonl(documents, pairs, seed=args.gsg_seed, options=options)
        print(f"GSG: {stats.examples} examples from {stats.documents} documents "
              f"({stats.skipped} with fewer than two sentences skipped) → {pairs}", flush=True)
        return _train([TRAIN_DATA_FLAG, str(pairs), *args.train_args])


def _train(argv: list[str]) -> int:
    """Run the `train` subcommand on ``argv`` exactly as ``pegasus-x train ARGV`` would."""
    from .training import commands

    parser = argparse.ArgumentParser(prog="pegasus-x pretrain --")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return args.func(args)
