"""Self-supervised "section lead" pairs from the training documents (no NAME lines used).

A small model trained from scratch on ~3k (page, NAME line) pairs learns a language model of NAME lines
and ignores its input. This stage teaches it to read and copy first: for every section of every training
page (except boilerplate ones), the input is the page from that section's heading on and the target is the
section's first sentence; for the DESCRIPTION section the whole page is also used as input, so the model
learns to find that section. This is the "Lead" pre-training objective of the PEGASUS paper applied per
section; the real pairs are used afterwards.

Usage::

    python examples/manpages/pseudo_pairs.py --data /tmp/pegasus-x-manpages/train.jsonl \\
        --out /tmp/pegasus-x-manpages/pseudo-train.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import sys

SKIP = {"SYNOPSIS", "SEE ALSO", "AUTHOR", "AUTHORS", "COPYRIGHT", "REPORTING BUGS", "COLOPHON", "BUGS",
        "HISTORY", "STANDARDS", "VERSIONS", "LIBRARY", "ATTRIBUTES", "CONFORMING TO"}
HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&()'-]*$")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
MAX_TARGET_WORDS = 40


def sections(document: str) -> list[tuple[int, str, list[str]]]:
    """(line index, heading, paragraph lines) of a prepared document (headings are lines of capitals)."""
    lines = document.splitlines()
    found = []
    for i, line in enumerate(lines):
        if HEADING.match(line):
            body = []
            for nxt in lines[i + 1:]:
                if HEADING.match(nxt):
                    break
                body.append(nxt)
            found.append((i, line, body))
    return found


def pairs_of(document: str) -> list[dict[str, str]]:
    """The pseudo pairs of one document (see the module docstring)."""
    lines = document.splitlines()
    out = []
    for index, heading, body in sections(document):
        if heading in SKIP or not body:
            continue
        words = SENTENCE.split(body[0], maxsplit=1)[0].split()
        if len(words) < 3:
            continue
        target = " ".join(words[:MAX_TARGET_WORDS])
        out.append({"source": "\n".join(lines[index:]), "target": target})
        if heading == "DESCRIPTION":
            out.append({"source": document, "target": target})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="JSONL with the documents in 'source'")
    parser.add_argument("--out", required=True, help="pseudo-pair JSONL to write")
    args = parser.parse_args(argv)
    count = 0
    with open(args.data, encoding="utf-8") as src, open(args.out, "w", encoding="utf-8") as dst:
        for line in src:
            for pair in pairs_of(json.loads(line)["source"]):
                dst.write(json.dumps(pair, ensure_ascii=False) + "\n")
                count += 1
    print(f"{count} pseudo pairs -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
