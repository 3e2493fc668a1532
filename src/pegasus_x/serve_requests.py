"""What a ``POST /v1/summarize`` asks for, read and checked before any work starts.

A request is a JSON object (``{"text": ..., "stream": ..., <generation options>}``) or a multipart form with the
same fields (values written as JSON literals: ``4``, ``true``, ``0.8``) and optionally a ``file``: plain text,
Markdown (loses its markup) or PDF (its text layer, when ``pypdf`` is installed). The generation options are
``generate``'s own names, except those the service decides itself (one summary per request, the checkpoint's
special tokens). Everything wrong raises :class:`~pegasus_x.errors.RequestError` with the HTTP status and the field
at fault; nothing here needs the web framework.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

from . import strict_json
from .documents import MARKDOWN_SUFFIXES, check_not_binary, decode_text
from .errors import InputError, PegasusXError, RequestError

# generate() options a request may not set: the service returns one summary per request and streams by itself, and
# the special tokens are the checkpoint's (a custom pad would show in the summaries of a batch's shorter rows).
_SERVER_DECIDES = frozenset({"streamer", "generator", "num_return_sequences", "output_scores",
                             "return_dict_in_generate", "eos_token_id", "pad_token_id", "bos_token_id",
                             "decoder_start_token_id"})
MAX_BEAMS = 16  # a bound on one request's cost; the released models were tuned with at most 8
FILE_FIELD = "file"
PDF_MAGIC = b"%PDF-"


@dataclass
class SummaryRequest:
    """One checked request: the text, whether to stream it, and the ``generate`` options for it (the server's
    defaults with the request's over them)."""

    text: str
    stream: bool
    options: dict[str, Any]


def option_names() -> frozenset[str]:
    """The generation options a request may set."""
    from .generate import OPTION_NAMES

    return OPTION_NAMES - _SERVER_DECIDES


def from_json(body: bytes, summarizer: Any, max_input_bytes: int) -> SummaryRequest:
    """Read a JSON request body.

    Args:
        body: the raw body (already within the body limit).
        summarizer: the :class:`~pegasus_x.summarize.Summarizer` serving it (its defaults and model check options).
        max_input_bytes: the longest text accepted, in UTF-8 bytes.

    Raises:
        RequestError: not a JSON object, an unknown field, a bad value (422 naming it), a text too long (413).
    """
    try:
        fields = strict_json.loads(body.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise RequestError(f"the body is not UTF-8 (invalid byte at offset {exc.start})", field="body") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                           field="body") from None
    except ValueError as exc:
        raise RequestError(f"the body: {exc}", field="body") from None
    if not isinstance(fields, dict):
        raise RequestError(f"the body must be a JSON object with a 'text' field, got {type(fields).__name__}",
                           field="body")
    return _build(fields, None, summarizer, max_input_bytes)


def from_form(fields: dict[str, str], upload: tuple[str, str, bytes] | None, summarizer: Any,
              max_input_bytes: int) -> SummaryRequest:
    """Read a multipart form: ``fields`` (name → value text, each a JSON literal or a plain string) and ``upload``
    (file name, content type, content) of the ``file`` field, if any.

    Raises:
        RequestError: as :func:`from_json`; also a file that is not text, Markdown or a readable PDF (422).
    """
    values = {name: raw if name == "text" else _form_literal(name, raw) for name, raw in fields.items()}
    return _build(values, upload, summarizer, max_input_bytes)


def _form_literal(name: str, raw: str) -> Any:
    try:
        return strict_json.loads(raw)
    except json.JSONDecodeError:
        return raw  # a plain word (e.g. early_stopping=never): the option's own check judges it
    except ValueError as exc:
        raise RequestError(f"{name}: {exc}", field=name) from None


def _build(fields: dict[str, Any], upload: tuple[str, str, bytes] | None, summarizer: Any,
           max_input_bytes: int) -> SummaryRequest:
    allowed = option_names()
    unknown = sorted(k for k in fields if k not in allowed and k not in ("text", "stream"))
    if unknown:
        hint = ("; the service sets it itself" if unknown[0] in _SERVER_DECIDES
                else f"; known: text, stream, {', '.join(sorted(allowed))}")
        raise RequestError(f"unknown field {unknown[0]!r}{hint}", field=unknown[0])
    stream = fields.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", field="stream")
    if upload is not None:
        if "text" in fields:
            raise RequestError("give either a text or a file, not both", field=FILE_FIELD)
        text = file_text(*upload, max_input_bytes)
    else:
        text = _check_text(fields.get("text"), max_input_bytes)
    options = check_options(summarizer, {k: v for k, v in fields.items() if k not in ("text", "stream")})
    return SummaryRequest(text, stream, options)


def _check_text(text: Any, max_input_bytes: int) -> str:
    if text is None:
        raise RequestError("no 'text' field (or 'file' upload): nothing to summarize", field="text")
    if not isinstance(text, str):
        raise RequestError(f"text must be a string, got {type(text).__name__}", field="text")
    size = len(text.encode("utf-8"))
    if size > max_input_bytes:
        raise RequestError(f"text is {size:,} bytes; this server takes at most {max_input_bytes:,} "
                           "(--max-input-bytes)", status=413, field="text")
    if "\x00" in text:
        raise RequestError("text holds a NUL character; send plain text", field="text")
    if not text.strip():
        raise RequestError("text is empty; there is nothing to summarize", field="text")
    return text


def check_options(summarizer: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The ``generate`` options for a request: the server's defaults with ``given`` over them, each checked.

    Raises:
        RequestError: 422 naming the first bad option (its value out of range, or inconsistent with another).
    """
    from .generate import resolve_options

    model = summarizer.model
    limits = {"num_beams": MAX_BEAMS, "max_new_tokens": model.config.max_position_embeddings,
              "max_length": model.config.max_position_embeddings + 1}
    for name, value in given.items():
        if name in limits and isinstance(value, int) and not isinstance(value, bool) and value > limits[name]:
            raise RequestError(f"{name} must be at most {limits[name]} on this server, got {value}", field=name)
        try:
            resolve_options(model, {name: value}, model.device)
        except PegasusXError as exc:
            raise RequestError(str(exc), field=name) from None
    try:
        options = summarizer.generation_options(**given)
        resolve_options(model, options, model.device)
    except PegasusXError as exc:
        message = str(exc)
        field = next((name for name in sorted(given, key=message.find) if name in message), None)
        raise RequestError(message, field=field) from None
    return options


def file_text(name: str, content_type: str, data: bytes, max_input_bytes: int) -> str:
    """The text of an uploaded file: UTF-8 text, Markdown without its markup, or a PDF's text layer.

    Raises:
        RequestError: too large (413), binary, not UTF-8, empty, or a PDF that cannot be read (422).
    """
    label = f"the file {name!r}" if name else "the file"
    if len(data) > max_input_bytes:
        raise RequestError(f"{label} is {len(data):,} bytes; this server takes at most {max_input_bytes:,} "
                           "(--max-input-bytes)", status=413, field=FILE_FIELD)
    try:
        if data.startswith(PDF_MAGIC) or name.lower().endswith(".pdf") or content_type == "application/pdf":
            return _pdf_text(data, label)
        check_not_binary(data, label)
        markdown = name.lower().endswith(MARKDOWN_SUFFIXES) or content_type == "text/markdown"
        return decode_text(data, label, markdown=markdown)
    except InputError as exc:
        raise RequestError(str(exc), field=FILE_FIELD) from None


def _pdf_text(data: bytes, label: str) -> str:
    try:
        import pypdf
    except ImportError:
        raise InputError(f"{label} is a PDF; reading PDFs needs pypdf on the server (pip install pypdf), or send "
                         "its text") from None
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise InputError(f"{label} is an encrypted PDF; send it unencrypted or send its text")
        text = "\n".join(page.extract_text() or "" for page in reader.pages)
    except InputError:
        raise
    except Exception as exc:  # pypdf raises many types on malformed files; the client only needs to know it failed
        raise InputError(f"{label} is not a readable PDF ({type(exc).__name__}: {exc})") from None
    if not text.strip():
        raise InputError(f"{label} is a PDF without a text layer (a scan?); send its text")
    return text
