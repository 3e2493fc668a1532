"""Markdown clean-up (pegasus_x.markdown) in linear time.

The oracle below is the regex rule set the linear scanner replaced: on ordinary text both must agree.
"""

from __future__ import annotations

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pegasus_x.markdown import markdown_to_text

# The former rules (lazy, backtracking regexes): exact on ordinary Markdown, quadratic on adversarial input.
REGEX_RULES = [
    (re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"!\[([^\]]*)\]\([^)]*\)"), r"\1"),
    (re.compile(r"\[([^\]]+)\]\([^)]*\)"), r"\1"),
    (re.compile(r"^ {0,3}(#{1,6}|>+|[-*+]|\d+[.)])[ \t]+", re.M), ""),
    (re.compile(r"(\*\*|__|`)(.+?)\1"), r"\2"),
    (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"), r"\1"),
]


def regex_markdown(text: str) -> str:
    for pattern, replacement in REGEX_RULES:
        text = pattern.sub(replacement, text)
    return text


# ---------------------------------------------------------------------------------------------------- Markdown
MARKDOWN_PIECES = ["*", "**", "_", "__", "`", "```", "~~~", "[", "]", "(", ")", "![", "<!--", "-->", "#", "# ",
                   ">", "> ", "- ", "1. ", "2)", " ", "  ", "\n", "\t", "a", "word", "é", "_x", "x_", "3"]


@settings(max_examples=250, deadline=None)
@given(st.lists(st.sampled_from(MARKDOWN_PIECES), max_size=30))
def test_markdown_matches_the_regex_rules(pieces):
    text = "".join(pieces)
    assert markdown_to_text(text) == regex_markdown(text)


def test_markdown_on_a_document():
    text = ("# Report\n\nSee [the *annual* report](http://x.org/r) and ![a chart](c.png).\n```python\nx = 1\n```\n"
            "> **Bold** and __strong__ with `code`, *emphasis* and 2*3*4.\n<!-- a\ncomment -->\n- item\n"
            "~~~\nunclosed fence")
    assert markdown_to_text(text) == regex_markdown(text)
    assert markdown_to_text(text) == ("Report\n\nSee the annual report and a chart.\n\nBold and strong with code, "
                                      "emphasis and 2*3*4.\n\nitem\n~~~\nunclosed fence")


ADVERSARIAL = {  # each about 200 KB; the regex rules take from seconds to hours on these
    "unclosed emphasis": " *a" * 70000,
    "bold runs": "**a " * 50000,
    "brackets": "[" * 200000,
    "images": "![" * 100000,
    "link openers": "[a](" * 50000,
    "backticks": "``" * 100000,
    "comments": "<!--" * 50000,
    "fences": "```a\n~~~\n" * 25000,
    "unclosed fences": "```\n" * 50000,
    "nested bold": "**" * 50000 + "a" + "*" * 99999,
    "long line markers": ">" * 100000 + "x\n" + "1" * 100000 + "x",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_markdown_is_linear_on_adversarial_input(name):
    text = ADVERSARIAL[name]
    start = time.perf_counter()
    markdown_to_text(text)
    assert time.perf_counter() - start < 2.0, f"{name}: {len(text):,} characters took too long"


def test_markdown_to_text():
    text = ("## Title\n> quoted *word* and `code`\n- item one\n1. first\n![a chart](c.png) [link](u) "
            "snake_case_name 2*3*4\n~~~\nhidden\n~~~\n<!-- note -->end")
    assert markdown_to_text(text) == ("Title\nquoted word and code\nitem one\nfirst\na chart link "
                                      "snake_case_name 2*3*4\n\nend")
