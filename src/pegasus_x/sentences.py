"""Sentence splitting, the package's one splitter: pretraining's gap sentences and ROUGE-Lsum both use it.

A small documented rule set rather than NLTK's Punkt (not available offline): it knows common abbreviations
("Dr.", "e.g.", "Fig. 3") and initials, so it splits where a reader would.
"""

from __future__ import annotations

import re

# Words whose trailing period does not end a sentence. Lowercased, without the final period.
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs etc e.g i.e cf fig figs eq eqs no nos vol al approx "
                           "dept est inc ltd co corp jan feb mar apr jun jul aug sep sept oct nov dec u.s".split())
# A candidate end: terminal punctuation, optional closing quotes/brackets, then whitespace and a capital letter,
# digit or opening quote/bracket — or the end of the line.
_END = re.compile(r"""[.!?]+["')\]]*(?=\s+["'(\[]?[A-Z0-9]|\s*$)""")
# In text without capitals (lowercased corpora such as arXiv/PubMed summaries) case says nothing, so any word may
# start a sentence; abbreviations still hold.
_END_UNCASED = re.compile(r"""[.!?]+["')\]]*(?=\s+\S|\s*$)""")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, in order, without surrounding whitespace.

    Rules: a line break always ends a sentence; inside a line a sentence ends at ``.``/``!``/``?`` (plus any
    closing quotes or brackets) followed by whitespace and a capital letter, digit or opening quote/bracket —
    unless the word before a ``.`` is a known abbreviation (``Dr.``, ``e.g.``, ``Fig.``, …) or a single capital
    letter (an initial, as in ``J. Smith``). Lowercase after a period (``approx. five``) never splits — unless
    the text has no capital letter at all (a lowercased corpus), where any word may follow.
    """
    ends = _END if any(c.isupper() for c in text) else _END_UNCASED
    spans = []
    for line in re.finditer(r"[^\n]+", text):
        start = line.start()
        for end in ends.finditer(line.group()):
            stop = line.start() + end.end()
            if end.group().startswith(".") and _is_abbreviation(text[start:line.start() + end.start()]):
                continue
            spans.append((start, stop))
            start = stop
        spans.append((start, line.end()))
    return [s for s in (_strip(text, a, b) for a, b in spans) if s[0] < s[1]]


def _is_abbreviation(before: str) -> bool:
    word = before.rsplit(None, 1)[-1] if before.strip() else ""
    word = word.lstrip("\"'([")
    return word.lower() in _ABBREVIATIONS or (len(word) == 1 and word.isupper())


def _strip(text: str, a: int, b: int) -> tuple[int, int]:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return a, b


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (see :func:`sentence_spans` for the rules)."""
    return [text[a:b] for a, b in sentence_spans(text)]
