"""JSON for records whose values become text and JSON again: :func:`loads`, stricter than ``json.loads``.

``json.loads`` accepts three things that break later, far from the file that held them: ``NaN`` / ``Infinity``
(not JSON; ``json.dumps`` writes them back bare, so an output file would not be JSON either), strings holding a
lone UTF-16 surrogate such as ``"\\ud800"`` (not text: encoding it as UTF-8 fails), and nesting deep enough to
exhaust Python's recursion limit (a ``RecursionError``). :func:`loads` refuses each with a message that says so.
"""

from __future__ import annotations

import json
import re
from typing import Any

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
