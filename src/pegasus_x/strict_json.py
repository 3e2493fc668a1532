"""JSON for records whose values become text and JSON again: :func:`loads`, stricter than ``json.loads``.

``json.loads`` accepts three things that break later, far from the file that held them: ``NaN`` / ``Infinity``
(not JSON; ``json.dumps`` writes them back bare, so an output file would not be JSON either), strings holding a
lone UTF-16 surrogate such as ``"\\ud800"`` (not text: encoding it as UTF-8 fails), and nesting deep enough to
exhaust Python's recursion limit (a ``RecursionError``). :func:`loads` refuses each with a message that says so.
:func:`read_object` reads a checkpoint's small JSON files with it, size-limited, into one JSON object.
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any, Callable

# A lone surrogate can only come from a \uD800-\uDFFF escape: the UTF-8 decoder refuses encoded surrogates.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads(text: str) -> Any:
    """Parse one JSON document, refusing what ``json.loads`` lets through but nothing can use.

    Args:
        text: the JSON text.

    Returns:
        The parsed value.

    Raises:
        json.JSONDecodeError: the text is not JSON (``msg`` says why).
        ValueError: ``NaN`` or ``±Infinity``, a string with a lone surrogate, or nesting too deep to parse; the
            message names the problem and the fix, to be prefixed with where the text came from.
    """
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested more deeply than Python can parse; flatten the record") from None
    if _SURROGATE_ESCAPE.search(text):  # rare, so the full check runs only then
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            code = f"\\u{ord(exc.object[exc.start]):04x}"
            raise ValueError(f"a string holds the lone surrogate {code} (half of a UTF-16 pair), which is not "
                             "text; fix the program that wrote it") from None
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value; write null, a number or a string instead")


# Model files (config.json, generation_config.json, tokenizer_config.json, special_tokens_map.json, shard
# indexes) are a few kB; an index of many thousand tensors stays far below this.
MODEL_FILE_LIMIT = 16 * 2**20


def read_object(path: str | os.PathLike, error: Callable[[str], Exception], *,
                fix: str = "re-download it or fix it", limit: int = MODEL_FILE_LIMIT) -> dict[str, Any]:
    """Read a small JSON file that must hold one object: the one reader of a checkpoint's JSON files.

    The size is checked before anything is parsed, and only regular files are read (a FIFO or device named
    ``config.json`` would block or never end).

    Args:
        path: the file.
        error: the exception type to raise (e.g. ``CheckpointError``); it gets a one-line message naming the file.
        fix: what the user can do, appended to every message.
        limit: the largest size in bytes.

    Returns:
        The parsed object.

    Raises:
        error: the file is unreadable, not a regular file, larger than ``limit``, not UTF-8, not JSON, holds
            NaN / a lone surrogate / nesting too deep to parse, or its top level is not an object.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise error(f"cannot read {path} ({exc.strerror}); {fix}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{path} is not a regular file; {fix}")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(limit + 1)
        except OSError as exc:
            raise error(f"cannot read {path} ({exc.strerror}); {fix}") from None
    if len(raw) > limit:
        raise error(f"{path} is larger than {limit:,} bytes, far more than such a file holds; {fix}")
    try:
        data = loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno}); {fix}") from None
    except ValueError as exc:
        raise error(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object {{...}}, not {_kind(data)}; {fix}")
    return data


def _kind(value: Any) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
