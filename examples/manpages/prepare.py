"""Build a summarization corpus from the manual pages installed on this machine.

Each page is rendered by ``man`` (80 columns, no hyphenation or justification, ``col -bx``); the
document is the rendered text without its NAME section and without the header/footer lines, and the
summary is the description of the NAME line (``ls - list directory contents`` → "list directory
contents"), written by the page's authors. Pages whose rendered document is identical (``.so``
aliases) are kept once. The split is by page and deterministic: a hash of the page's file name puts
about 4% into ``test`` and 2% into ``validation``.

Usage::

    apt-get install -y man-db manpages manpages-dev
    python examples/manpages/prepare.py --out /tmp/pegasus-x-manpages

Writes ``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (fields ``name``, ``source``, ``target``)
and ``stats.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

SECTIONS = ("1", "2", "3", "4", "5", "6", "7", "8")
# gcloud ships ~16k machine-generated pages that would swamp everything else; other pages are hand written.
EXCLUDED_PREFIXES = ("gcloud",)
HEADING = re.compile(r"^[A-Z][A-Z0-9 ,/&()'-]*$")
NAME_SPLIT = re.compile(r"\s+(?:-|\\-|—|–|--)\s+")
MIN_DOCUMENT_WORDS = 40


def page_files(root: Path) -> list[Path]:
    """Every English page file under ``root``/man1..man8, sorted, generated gcloud pages excluded."""
    files = []
    for section in SECTIONS:
        folder = root / f"man{section}"
        if folder.is_dir():
            files += [p for p in folder.iterdir() if not p.name.startswith(EXCLUDED_PREFIXES)]
    return sorted(files)


def render(path: Path, width: int = 80) -> str:
    """The page as plain text, as ``man`` shows it in an 80-column terminal, without overstrikes."""
    env = {**os.environ, "MANWIDTH": str(width), "MANPAGER": "cat", "PAGER": "cat", "LC_ALL": "C.UTF-8"}
    env.pop("MAN_KEEP_FORMATTING", None)
    man = subprocess.run(["man", "--nh", "--nj", "-l", str(path)], env=env, capture_output=True, timeout=60)
    col = subprocess.run(["col", "-bx"], input=man.stdout, capture_output=True, timeout=60)
    return col.stdout.decode("utf-8", errors="replace")


def split_sections(text: str) -> list[tuple[str, list[str]]]:
    """[(heading, body lines)] of a rendered page; the first and last lines (header, footer) are dropped."""
    lines = text.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    lines = lines[1:-1]
    sections: list[tuple[str, list[str]]] = []
    for line in lines:
        if line and not line[0].isspace() and HEADING.match(line.strip()):
            sections.append((line.strip(), []))
        elif sections:
            sections[-1][1].append(line)
    return sections


def paragraphs(lines: list[str]) -> list[str]:
    """Reflow a section's lines: blank lines separate paragraphs, each paragraph becomes one line."""
    out, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            out.append(" ".join(current))
            current = []
    return out


def to_example(path: Path) -> dict | None:
    """{name, source, target} of one page, or None when the page has no usable NAME line or body."""
    try:
        text = render(path)
    except (subprocess.SubprocessError, OSError):
        return None
    sections = split_sections(text)
    names = [body for heading, body in sections if heading == "NAME"]
    if not names:
        return None
    name_line = " ".join(" ".join(line.split()) for line in names[0] if line.strip())
    parts = NAME_SPLIT.split(name_line, maxsplit=1)
    if len(parts) != 2 or not parts[1].strip():
        return None
    summary = parts[1].strip()
    body = []
    for heading, lines in sections:
        if heading != "NAME":
            body.append(heading)
            body += paragraphs(lines)
    document = "\n".join(body)
    if len(document.split()) < MIN_DOCUMENT_WORDS:
        return None
    return {"name": path.name, "source": document, "target": summary}


def split_of(name: str) -> str:
    """Deterministic split by file name: ~4% test, ~2% validation, the rest train."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
    return "test" if bucket < 4 else "validation" if bucket < 6 else "train"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder for the JSONL splits")
    parser.add_argument("--man-root", default="/usr/share/man", help="folder holding man1..man8")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    files = page_files(Path(args.man_root))
    if not files:
        print(f"no manual pages under {args.man_root}; apt-get install -y man-db manpages manpages-dev",
              file=sys.stderr)
        return 2
    with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        examples = [e for e in pool.map(to_example, files, chunksize=32) if e is not None]
    seen, splits = set(), {"train": [], "validation": [], "test": []}
    for example in examples:
        key = hashlib.sha256(example["source"].encode()).hexdigest()
        if key in seen:            # .so aliases render to the same page
            continue
        seen.add(key)
        splits[split_of(example["name"])].append(example)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    stats = {"pages": len(files), "usable": len(examples), "unique": len(seen),
             **{split: len(rows) for split, rows in splits.items()}}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
