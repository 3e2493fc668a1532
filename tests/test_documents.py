"""Reading the texts to summarize (pegasus_x.documents): byte limits, endless streams, JSONL lines."""

from __future__ import annotations

import io
import json
import sys
import time
import warnings
from pathlib import Path

import pytest

from pegasus_x import cli, documents
from pegasus_x.cli import main

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
