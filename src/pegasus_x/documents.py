"""Reading the documents to summarize: text and Markdown files, stdin, JSONL corpora; bounded and strict.

Every input is read in pieces up to a byte limit (:data:`MAX_INPUT_BYTES` unless told), so an endless or huge input
stops at once; NUL bytes, invalid UTF-8, empty texts and unusable JSON (NaN, lone surrogates, deep nesting) are
refused with an :class:`~pegasus_x.errors.InputError` that names the input. Markdown loses its markup
(:mod:`pegasus_x.markdown`). The ``summarize`` command and the service read through here.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from . import strict_json
from .errors import InputError
from .markdown import markdown_to_text

TEXT_FIELD = "text"
MARKDOWN_SUFFIXES = (".md", ".markdown")
# Default of --max-input-bytes: far more text than 16,384 tokens, and room for a book with --chunked, yet an
# endless or huge input (/dev/zero, a disk image) stops after a moment. Also the longest --input line.
MAX_INPUT_BYTES = 8 * 2**20
_READ_PIECE = 2**20  # bytes per read while an input is read up to its limit


@dataclass
class Document:
    """One input: ``name`` for messages, ``key`` for its output record (``path``, or ``index`` [+ ``id``])."""

    name: str
    text: str
    key: dict[str, Any]


def read_documents(paths: list[str], corpus: str | None, text_field: str = TEXT_FIELD,
                   limit: int = MAX_INPUT_BYTES) -> list[Document]:
    """The documents to summarize: text or Markdown files (``'-'`` is stdin; no path: piped stdin) or a JSONL
    ``corpus`` with a string field ``text_field`` per line. Each file is read up to ``limit`` bytes (a warning says
    what was dropped); each corpus line may hold at most ``limit`` bytes.

    Raises:
        InputError: nothing to read, a missing, binary, non-UTF-8 or empty input, or a bad corpus line.
    """
    if corpus is not None:
        if paths:
            raise InputError("give either PATHs or --input JSONL, not both")
        return read_jsonl(corpus, text_field, limit)
    if not paths:
        if sys.stdin is None or sys.stdin.isatty():
            raise InputError("nothing to summarize: pass text files, '-' to read stdin (or pipe text in), or "
                             "--input docs.jsonl")
        paths = ["-"]
    if paths.count("-") > 1:
        raise InputError("'-' (stdin) can be given only once")
    return [Document("<stdin>" if p == "-" else p, read_text(p, limit), {"path": p}) for p in paths]


def read_text(path: str, limit: int) -> str:
    """The text of a file (or of stdin for '-'), cut to ``limit`` bytes; Markdown files lose their markup."""
    if path == "-":
        return decode_text(_read_prefix(sys.stdin.buffer, "stdin", limit), "stdin", markdown=False)
    with _open(path) as file:
        data = _read_prefix(file, path, limit)
    return decode_text(data, path, markdown=path.lower().endswith(MARKDOWN_SUFFIXES))


def _open(path: str) -> BinaryIO:
    if Path(path).is_dir():
        raise InputError(f"{path} is a directory; pass text or Markdown files (or --input docs.jsonl)")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_prefix(file: BinaryIO, name: str, limit: int) -> bytes:
    """At most ``limit`` bytes of ``file``, cut at a UTF-8 character boundary, with a warning when more was there.

    Reads in pieces and stops at the limit, so an endless input (``/dev/zero``, ``yes |``) costs at most that.
    """
    pieces, size = [], 0
    while size <= limit:
        try:
            piece = file.read(min(_READ_PIECE, limit + 1 - size))
        except OSError as exc:
            raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None
        if not piece:
            return b"".join(pieces)
        check_not_binary(piece, name)
        pieces.append(piece)
        size += len(piece)
    data = b"".join(pieces)
    cut = limit
    while cut > max(limit - 3, 0) and data[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte: back to its start
        cut -= 1
    try:
        info = os.fstat(file.fileno())
    except (OSError, ValueError):  # no file descriptor (io.UnsupportedOperation is both)
        info = None
    dropped = (f"dropped the last {info.st_size - cut:,} bytes" if info is not None and stat.S_ISREG(info.st_mode)
               else "did not read the rest")  # a pipe or device: its length is unknown
    if os.environ.get("RANK", "0") == "0":  # under torchrun every process reads every input; one warning is enough
        warnings.warn(f"{name}: read the first {cut:,} bytes (--max-input-bytes {limit:,}) and {dropped}; raise "
                      "--max-input-bytes to read more")
    return data[:cut]


def check_not_binary(data: bytes, name: str) -> None:
    if b"\x00" in data:
        raise InputError(f"{name} is a binary file (it holds NUL bytes); pass plain text or Markdown")


def decode_text(data: bytes, name: str, markdown: bool) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not UTF-8 text (invalid byte at offset {exc.start}); convert it first, e.g. "
                         "iconv -t UTF-8") from None
    if markdown:
        text = markdown_to_text(text)
    if not text.strip():
        raise InputError(f"{name} is empty; there is nothing to summarize")
    return text


def read_jsonl(path: str, field: str, limit: int) -> list[Document]:
    """The records of a JSONL corpus, read line by line; each line may hold at most ``limit`` bytes."""
    docs = []
    with _open(path) as file:
        for number, raw in enumerate(iter(lambda: file.readline(limit + 1), b""), 1):
            where = f"{path}:{number}"
            check_not_binary(raw, path)
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise InputError(f"{where}: the line is longer than --max-input-bytes ({limit:,} bytes); raise "
                                 "it or shorten the record")
            if raw.strip():
                docs.append(_jsonl_record(raw, where, field, len(docs)))
    if not docs:
        raise InputError(f"{path} holds no records; expected one JSON object per line")
    return docs


def _jsonl_record(raw: bytes, where: str, field: str, index: int) -> Document:
    try:
        record = strict_json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: not UTF-8 text (invalid byte at offset {exc.start} of the line); convert the "
                         "file first, e.g. iconv -t UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{where}: no string field {field!r} (found: {keys}); name it with --text-field")
    if not record[field].strip():
        raise InputError(f"{where}: the {field!r} field is empty; there is nothing to summarize")
    key: dict[str, Any] = {"index": index}
    if "id" in record:
        key["id"] = record["id"]
    return Document(f"{where} (id {record['id']})" if "id" in record else where, record[field], key)
