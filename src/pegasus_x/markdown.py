"""Markdown to plain prose, in time linear in the text's length.

The rules (applied in this order, each to the previous one's result):

1. fenced code blocks: from a line starting with ```` ``` ```` or ``~~~`` to the next line starting with the same
   marker, both lines included, become one empty line (an unclosed fence stays as it is);
2. HTML comments ``<!-- ... -->`` are dropped (an unclosed one stays);
3. images ``![alt](url)`` become ``alt``, then links ``[text](url)`` become ``text``;
4. heading, quote and list markers at the start of a line (up to three spaces in) are dropped;
5. ``**bold**``, ``__bold__`` and ```code``` (within one line) lose their delimiters;
6. ``*emphasis*`` (within one line; the opening ``*`` not after a word character or ``*`` nor before a space, the
   closing one not after a space nor before a word character or ``*``) loses its stars.

Each pair is matched leftmost first with the *nearest* closer, as a lazy regular expression would. Such regexes
backtrack, though: every unclosed opener rescans the rest of the text, so input full of openers takes quadratic
time. Here each rule finds every opener and closer position once (fixed-width patterns) and pairs them by
bisection, so no position is looked at more than a bounded number of times.
"""

from __future__ import annotations

import re
from bisect import bisect_left

_FENCES = ("```", "~~~")
_LINE_MARKER = re.compile(r"^ {0,3}(#{1,6}|>+|[-*+]|\d+[.)])[ \t]+", re.M)  # anchored per line: linear
# Rule 5's delimiters, tried in this order at a position (a position starts at most one of them).
_DELIMITERS = {"**": re.compile(r"(?=\*\*)"), "__": re.compile(r"(?=__)"), "`": re.compile(r"`")}
_EMPHASIS_OPEN = re.compile(r"(?<![\w*])\*(?!\s)")
_EMPHASIS_CLOSE = re.compile(r"(?<!\s)\*(?![\w*])")
_CLOSE_BRACKET, _CLOSE_PAREN, _NEWLINE = re.compile(r"\]"), re.compile(r"\)"), re.compile(r"\n")


def markdown_to_text(text: str) -> str:
    """Plain prose from Markdown: code blocks and comments dropped; links, emphasis, headings reduced to text.

    Args:
        text: Markdown source.

    Returns:
        The text without markup (see the module docstring for the exact rules); linear time in ``len(text)``.
    """
    text = _drop_fences(text)
    text = _drop_comments(text)
    text = _unwrap_links(text, "![", empty_ok=True)
    text = _unwrap_links(text, "[", empty_ok=False)
    text = _LINE_MARKER.sub("", text)
    delimiters = {d: _starts(p, text) for d, p in _DELIMITERS.items()}
    text = _unwrap_pairs(text, [(i, d) for d, starts in delimiters.items() for i in starts], delimiters)
    return _unwrap_pairs(text, [(p, "*") for p in _starts(_EMPHASIS_OPEN, text)],
                         {"*": _starts(_EMPHASIS_CLOSE, text)})


def _starts(pattern: re.Pattern[str], text: str) -> list[int]:
    return [m.start() for m in pattern.finditer(text)]


def _next(positions: list[int], at_least: int) -> int:
    """The first of the sorted ``positions`` that is ``>= at_least``, or -1."""
    i = bisect_left(positions, at_least)
    return positions[i] if i < len(positions) else -1


def _drop_fences(text: str) -> str:
    lines = text.split("\n")
    starts = {f: [i for i, line in enumerate(lines) if line.startswith(f)] for f in _FENCES}
    out, i = [], 0
    while i < len(lines):
        fence = next((f for f in _FENCES if lines[i].startswith(f)), None)
        end = _next(starts[fence], i + 1) if fence else -1
        if end < 0:
            out.append(lines[i])
            i += 1
        else:
            out.append("")  # the block's lines become one empty line
            i = end + 1
    return "\n".join(out)


def _drop_comments(text: str) -> str:
    out, cur = [], 0
    while (start := text.find("<!--", cur)) >= 0:
        end = text.find("-->", start + 4)
        if end < 0:  # no later comment can close either
            break
        out.append(text[cur:start])
        cur = end + 3
    out.append(text[cur:])
    return "".join(out)


def _unwrap_links(text: str, opener: str, empty_ok: bool) -> str:
    """``OPENER label](target)`` -> ``label``; the label holds no ``]`` (it may span lines), the target no ``)``."""
    closes, parens = _starts(_CLOSE_BRACKET, text), _starts(_CLOSE_PAREN, text)
    out, cur = [], 0
    start = text.find(opener)
    while start >= 0:
        label = start + len(opener)
        close = _next(closes, label)
        if close >= 0 and (empty_ok or close > label) and text.startswith("(", close + 1):
            end = _next(parens, close + 2)
            if end >= 0:
                out += [text[cur:start], text[label:close]]
                cur = end + 1
        start = text.find(opener, max(cur, start + 1))
    out.append(text[cur:])
    return "".join(out)


def _unwrap_pairs(text: str, openers: list[tuple[int, str]], closers: dict[str, list[int]]) -> str:
    """Replace ``D inside D`` by ``inside`` for each opener (position, delimiter D), leftmost first, with the
    nearest closer of D that leaves at least one character inside and is on the opener's line."""
    newlines = _starts(_NEWLINE, text)
    out, cur = [], 0
    for start, delim in sorted(openers):
        if start < cur:
            continue
        inside = start + len(delim)
        close = _next(closers[delim], inside + 1)
        line_end = _next(newlines, start)
        if close < 0 or 0 <= line_end < close:
            continue
        out += [text[cur:start], text[inside:close]]
        cur = close + len(delim)
    out.append(text[cur:])
    return "".join(out)
