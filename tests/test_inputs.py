"""Reading inputs: Markdown clean-up in linear time, byte limits, JSON(L) that parses but cannot be used.

The Markdown oracle below is the regex rule set the linear scanner replaced: on ordinary text both must agree.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pegasus_x import PegasusXConfig, PegasusXForConditionalGeneration, cli, documents
from pegasus_x.cli import main
from pegasus_x.training.data import load_pairs
from pegasus_x.errors import DataError, InputError
from pegasus_x.markdown import markdown_to_text
from pegasus_x.pretraining import read_documents
from pegasus_x.summarize import Summarizer
from pegasus_x.tokenizer import PegasusTokenizer

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


# ---------------------------------------------------------------------------------------------------- byte limits
def summarize_error(args: list[str], capsys) -> str:
    """main()'s one error line for inputs that fail while being read (before any model is loaded)."""
    assert main(["summarize", "--model", "/nonexistent-model", *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1].startswith("pegasus-x: error: ") and err.endswith("\n")
    return err


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("flag", [[], ["--input"]])
def test_dev_zero_stops_at_the_limit(flag, capsys):
    start = time.perf_counter()
    err = summarize_error([*flag, "/dev/zero"], capsys)
    assert "/dev/zero is a binary file" in err and err.count("\n") == 1
    assert time.perf_counter() - start < 2.0


def test_a_file_over_the_limit_is_cut_at_a_character_boundary(tmp_path, capsys):
    path = tmp_path / "big.txt"
    path.write_text("é" * 1000, encoding="utf-8")  # 2,000 bytes; 101 splits the 51st "é"
    with pytest.warns(UserWarning) as caught:
        assert documents.read_text(str(path), 101) == "é" * 50
    (warning,) = caught
    assert str(warning.message) == (f"{path}: read the first 100 bytes (--max-input-bytes 101) and dropped the last "
                                    "1,900 bytes; raise --max-input-bytes to read more")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert documents.read_text(str(path), 2000) == "é" * 1000  # exactly the limit: nothing dropped, no warning
    # Through main: the warning is one line, then reading goes on (here to the missing model).
    err = summarize_error(["--max-input-bytes", "1000", str(path)], capsys)
    assert err.startswith(f"pegasus-x: warning: {path}: read the first 1,000 bytes") and "does not exist" in err


class Endless(io.RawIOBase):
    """A stream that never ends (like `yes |`): reading it whole would never finish."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        buffer[:] = b"y\n" * (len(buffer) // 2) + b"y" * (len(buffer) % 2)
        return len(buffer)


def test_endless_stdin_is_read_up_to_the_limit(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(Endless())))
    opts = cli.SummarizeOptions.from_args(cli.build_parser().parse_args(["summarize", "--max-input-bytes", "64"]))
    with pytest.warns(UserWarning, match=r"stdin: read the first 64 bytes .* and did not read the rest"):
        (doc,) = documents.read_documents(opts.paths, opts.input, opts.text_field, opts.max_input_bytes)
    assert doc.text == "y\n" * 32


def test_jsonl_lines_are_limited_not_the_corpus(tmp_path, capsys):
    lines = [json.dumps({"text": f"document {i} " * 20, "id": i}) for i in range(50)]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    limit = max(len(line) for line in lines)
    docs = documents.read_jsonl(str(corpus), "text", limit)  # the file is 50 times the limit; each line fits
    assert [d.key for d in docs] == [{"index": i, "id": i} for i in range(50)]
    corpus.write_text(lines[0] + "\n" + json.dumps({"text": "x" * (limit + 1)}) + "\n")
    err = summarize_error(["--max-input-bytes", str(limit), "--input", str(corpus)], capsys)
    assert f"docs.jsonl:2: the line is longer than --max-input-bytes ({limit:,} bytes)" in err


# ---------------------------------------------------------------------------------------------------- JSON that parses
BAD_JSON = {  # line 2 of a corpus -> the error's words
    "lone surrogate in the text": ('{"text": "a\\ud800b"}', "a string holds the lone surrogate \\ud800"),
    "lone surrogate in the id": ('{"text": "ok", "id": ["x", "\\udfff"]}', "a string holds the lone surrogate \\udfff"),
    "NaN id": ('{"text": "ok", "id": NaN}', "NaN is not a JSON value"),
    "Infinity": ('{"text": "ok", "score": -Infinity}', "-Infinity is not a JSON value"),
    "deep nesting": ('{"text": "ok", "id": ' + "[" * 100000 + "]" * 100000 + "}", "nested more deeply"),
}


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_jsonl_values_nothing_can_use_are_refused(name, tmp_path, capsys):
    line, message = BAD_JSON[name]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "fine", "id": "a\\ud83d\\ude00b"}\n' + line + "\n")  # a surrogate *pair* is fine
    err = summarize_error(["--input", str(corpus)], capsys)
    assert err.count("\n") == 1 and f"docs.jsonl:2: {message}" in err, err


@pytest.mark.parametrize("name", sorted(BAD_JSON))
def test_training_data_values_nothing_can_use_are_refused(name, tmp_path):
    line, message = BAD_JSON[name]
    line = line.replace('"text"', '"source": "s", "target"')
    (tmp_path / "train.jsonl").write_text('{"source": "s", "target": "t"}\n' + line + "\n")
    with pytest.raises(DataError, match=re.escape(f"train.jsonl line 2: {message}")):
        load_pairs(tmp_path / "train.jsonl")
    (tmp_path / "docs.json").write_text("[" + line.replace('"target"', '"text"') + "]")
    with pytest.raises(DataError, match=re.escape(f"docs.json: {message}")):
        read_documents(tmp_path / "docs.json")


# ---------------------------------------------------------------------------------------------------- chunking
LIMIT, BLOCK = 44, 8  # the tiny model's max_position_embeddings and block size: chunks of 40 tokens
LONG = " ".join(f"Sentence {i} tells of rivers, mountains and the harvest of year {1900 + i}." for i in range(12))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny PEGASUS-X (full PEGASUS vocabulary) saved with its tokenizer."""
    torch.manual_seed(0)
    config = PegasusXConfig.tiny(d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
                                 encoder_ffn_dim=64, decoder_ffn_dim=64, num_global_tokens=4, block_size=BLOCK,
                                 max_position_embeddings=LIMIT, init_std=1.0)
    folder = tmp_path_factory.mktemp("tiny")
    PegasusXForConditionalGeneration(config).save_pretrained(folder)
    PegasusTokenizer.pegasus().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def summarizer(checkpoint) -> Summarizer:
    return Summarizer(checkpoint, device="cpu")


@pytest.mark.parametrize("limit, new, smallest", [(2, 6, 8), (2, 4, 6), (20, 16, 24), (15, 14, 16)])
def test_chunks_no_longer_than_a_summary_are_refused(summarizer, limit, new, smallest):
    def small_summarizer(limit: int) -> Summarizer:
        return Summarizer(summarizer.model, summarizer.tokenizer, max_input_tokens=limit, max_new_tokens=new)

    small = small_summarizer(limit)
    with pytest.raises(InputError, match=f"a chunk holds {small.chunk_length() - 1} tokens of text but a summary "
                                         f"may take {new}.*use max_input_tokens >= {smallest}"):
        small(LONG, chunked=True)
    assert small_summarizer(smallest).chunk_length() - 1 > new >= small_summarizer(smallest - 1).chunk_length() - 1


def test_chunking_needs_a_summary_shorter_than_the_models_chunk(summarizer):
    with pytest.raises(InputError, match="reads at most 44 tokens, so use a max_new_tokens below 39"):
        summarizer(LONG, chunked=True, max_new_tokens=39)


def test_chunked_command_refuses_a_limit_that_cannot_finish(checkpoint, tmp_path, capsys):
    (tmp_path / "long.txt").write_text(LONG)
    args = ["summarize", "--model", str(checkpoint), "--chunked", "--max-input-tokens", "2", "--max-new-tokens",
            "6", str(tmp_path / "long.txt")]
    start = time.perf_counter()
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "use max_input_tokens >= 8 (--max-input-tokens)" in err
    assert time.perf_counter() - start < 10


@pytest.mark.slow
def test_chunked_fallback_warning_advises_shorter_summaries(summarizer, checkpoint, tmp_path, capsys):
    # Three chunks (39 + 39 + 2 text tokens) summarized in exactly 38 tokens each: together longer than the text,
    # so chunking stops after one round and the joined summaries are truncated.
    text = LONG[:len(LONG) // 2]
    with pytest.warns(UserWarning) as caught:
        summarizer(text, chunked=True, min_new_tokens=38, max_new_tokens=38)
    (warning,) = caught
    assert re.fullmatch(r"the text: the summaries of its 3 chunks together were no shorter than the text, so "
                        r"chunking stopped and dropped the last \d+ tokens of those summaries; lower max_new_tokens "
                        r"well below the 39 text tokens of a chunk", str(warning.message)), warning.message
    (tmp_path / "long.txt").write_text(text)
    assert main(["summarize", "--model", str(checkpoint), "--device", "cpu", "--chunked", "--min-new-tokens", "38",
                 "--max-new-tokens", "38", str(tmp_path / "long.txt")]) == 0
    err = capsys.readouterr().err
    assert "--chunked" not in err and "lower --max-new-tokens well below the 39 text tokens" in err, err


def test_python_texts_with_a_lone_surrogate_are_refused(summarizer):
    with pytest.raises(InputError, match=r"text 1 holds the lone surrogate \\ud800 .* at character 2"):
        summarizer(["fine", "ab\ud800c"])
