"""Lead baselines on a split: ROUGE of summaries cut from the start of each document, no model.

* ``lead-1``: the document's first sentence (split after ``.``, ``!``, ``?``; newlines count as spaces).
* ``lead-N``: the document's first N words (N = ``--words``, default 8, about the median NAME-line length).
* ``description-1``: the first sentence of the DESCRIPTION section, a stronger baseline that knows where
  man pages say what they are (falls back to lead-1 when a page has no DESCRIPTION).

Usage::

    python examples/manpages/baseline.py --data /tmp/pegasus-x-manpages/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from pegasus_x.training.data import load_pairs
from pegasus_x.metrics import rouge_scores

SENTENCE = re.compile(r"(?<=[.!?])\s+")


def first_sentence(text: str) -> str:
    return SENTENCE.split(" ".join(text.split()), maxsplit=1)[0]


def description_sentence(document: str) -> str:
    lines = document.splitlines()
    if "DESCRIPTION" in lines:
        body = lines[lines.index("DESCRIPTION") + 1:]
        if body:
            return first_sentence(body[0])
    return first_sentence(document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--words", type=int, default=8)
    args = parser.parse_args(argv)
    examples = load_pairs(args.data).examples
    references = [e.target for e in examples]
    baselines = {
        "lead-1": [first_sentence(e.source) for e in examples],
        f"lead-{args.words}": [" ".join(e.source.split()[:args.words]) for e in examples],
        "description-1": [description_sentence(e.source) for e in examples],
    }
    results = {name: rouge_scores(preds, references) for name, preds in baselines.items()}
    print(json.dumps({"count": len(examples), **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
