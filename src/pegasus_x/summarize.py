"""`Summarizer`: a loaded model + tokenizer that turns texts into summaries.

It owns the policy a user should not have to think about: batching by length, inputs longer than the model reads
(truncated with a count of dropped tokens, or summarized chunk by chunk), and streaming. The command line
(`pegasus-x summarize`) is a thin layer over this class. Generation defaults are ``generate``'s own (the
checkpoint's, resolved as transformers does: :mod:`pegasus_x.generation_config`), so a Summarizer and ``generate``
give the same ids for the same checkpoint and options.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import Tensor, nn

from .checkpoint import resolve
from .devices import auto_dtype, check_dtype, resolve_device
from .errors import CheckpointError, GenerationError, InputError
from .model import PegasusXForConditionalGeneration
from .quantize import check_kv_dtype, check_mode, check_on_cpu, quantize_model, quantized, set_kv_dtype
from .tokenizer import SPM_FILE, TOKENIZER_FILE, PegasusTokenizer

DEFAULT_BATCH_SIZE = 8
CHUNK_SEPARATOR = "\n"  # between chunk summaries before they are summarized again
# generate() options a Summarizer decides itself: one summary (a string) per text; the streamer is run()'s argument.
_NOT_OPTIONS = {"streamer", "num_return_sequences", "output_scores", "return_dict_in_generate"}


@dataclass
class Summary:
    """One input's summary and what it took to make it.

    Attributes:
        text: the summary.
        input_tokens: tokens in the input (``</s>`` included), before any truncation or chunking.
        dropped_tokens: input tokens the model never read (0 unless the input was too long and not chunked).
        chunks: inputs summarized separately first with ``chunked=True`` (0 when the input fit whole).
        seconds: wall time spent on this input (its equal share of the batch it ran in).
    """

    text: str
    input_tokens: int
    dropped_tokens: int
    chunks: int
    seconds: float


def demo_model_path() -> Path:
    """The model bundled with the package (``pegasus_x/assets/demo/``)."""
    return Path(str(resources.files(__package__).joinpath("assets", "demo")))


class Summarizer:
    """Keeps a model and its tokenizer loaded and summarizes texts with them.

    Example::

        summarize = Summarizer("google/pegasus-x-base", num_beams=4)
        summarize("A long document ...")            # -> str
        summarize(["doc one", "doc two"], max_new_tokens=64)   # -> list[str]

    Args:
        model: a checkpoint folder, a hub id (downloaded with ``huggingface_hub``), a loaded
            :class:`PegasusXForConditionalGeneration`, or None for the demo model bundled with the package.
        tokenizer: a :class:`PegasusTokenizer` or a tokenizer folder; default: the one saved with the model, or the
            bundled PEGASUS vocabulary (with a warning when a model folder has none).
        dtype: "fp32", "bf16" or a torch dtype; default :func:`pegasus_x.devices.auto_dtype`: bf16 on CUDA, fp32 on
            a CPU (a model object: as it is).
        quantize: ``"int8"``: int8 decoder and LM-head weights (:mod:`pegasus_x.quantize`; CPU only), or None.
        kv_dtype: ``"bf16"`` or ``"int8"``: generation's cross-attention keys/values kept narrower
            (:func:`pegasus_x.quantize.set_kv_dtype`; CPU only), or None (the model's dtype).
        device: "cpu", "cuda", "cuda:1", ...; default CUDA when available (a model object: where it is).
        batch_size: texts generated together (sorted by length so padding stays small).
        max_input_tokens: read at most this many tokens per input (``</s>`` included); default and upper bound:
            the smaller of ``tokenizer.model_max_length`` and ``config.max_position_embeddings``.
        newline_to_n: load the tokenizer with ``"\\n"`` ↔ ``<n>`` (models fine-tuned with the original pipeline).
        **generate_options: defaults for :func:`pegasus_x.generate.generate` (``num_beams``, ``max_new_tokens``, ...),
            over the checkpoint's ``generation_config`` (resolved by ``generate``, as transformers does).

    Raises:
        CheckpointError: the model folder or hub id cannot be found or loaded.
        ConfigError: a dtype other than fp32 / bf16, an unknown ``quantize`` or ``kv_dtype``, or either off the
            CPU.
        InputError: a device that is unknown or not available here, a bad batch size or input limit.
        GenerationError: an unknown generation option.
    """

    def __init__(self, model: str | os.PathLike | nn.Module | None = None,
                 tokenizer: PegasusTokenizer | str | os.PathLike | None = None, *,
                 dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                 quantize: str | None = None, kv_dtype: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_input_tokens: int | None = None, newline_to_n: bool = False, **generate_options: Any) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        check_kv_dtype(kv_dtype)
        self.model, folder = _load_model(model, dtype, device, check_mode(quantize), kv_dtype)
        self.device = self.model.device
        self.tokenizer = _load_tokenizer(tokenizer, folder, newline_to_n)
        if self.tokenizer.vocab_size > self.model.config.vocab_size:
            raise CheckpointError(f"the tokenizer has {self.tokenizer.vocab_size:,} ids but the model only "
                                  f"{self.model.config.vocab_size:,}; pass the tokenizer the model was trained with")
        self.batch_size = batch_size
        self.max_input_tokens = self._input_limit(max_input_tokens)
        _check_option_names(generate_options)
        self.defaults = {k: v for k, v in generate_options.items() if v is not None}
        self.generation_options()  # reject inconsistent defaults now rather than at the first call

    # ------------------------------------------------------------------ options
    def _input_limit(self, requested: int | None) -> int:
        limit = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        if requested is None:
            return limit
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 2:
            raise InputError(f"max_input_tokens must be an integer >= 2 (one token and </s>), got {requested!r}")
        return min(requested, limit)

    def generation_options(self, **overrides: Any) -> dict[str, Any]:
        """The options passed to ``generate``: the constructor's, then ``overrides``.

        ``generate`` fills every option not given here (the length too) from the checkpoint's
        ``generation_config``, exactly as transformers does (:mod:`pegasus_x.generation_config`).

        Raises:
            GenerationError: an option ``generate`` does not take, or ``min_new_tokens > max_new_tokens``.
        """
        _check_option_names(overrides)
        options = {**self.defaults, **{k: v for k, v in overrides.items() if v is not None}}
        low, high = options.get("min_new_tokens"), options.get("max_new_tokens")
        if isinstance(low, int) and isinstance(high, int) and low > high:
            raise GenerationError(f"min_new_tokens={low} is larger than max_new_tokens={high}; lower it")
        return options

    # ------------------------------------------------------------------ summarizing
    def __call__(self, text: str | Sequence[str], *, chunked: bool = False, **generate_options: Any
                 ) -> str | list[str]:
        """Summarize one text or a list of texts.

        Args:
            text: a string, or a list of strings (summarized in batches of similar length).
            chunked: summarize an input longer than :attr:`max_input_tokens` as block-aligned chunks, then
                summarize the joined chunk summaries; otherwise such an input is truncated (with a warning).
            **generate_options: override the defaults for this call (``num_beams``, ``max_new_tokens``, ...).

        Returns:
            The summary, or one summary per text.

        Raises:
            InputError: a text is not a string or is empty.
            GenerationError: an unknown or invalid generation option.
        """
        single = isinstance(text, str)
        results = self.run([text] if single else text, chunked=chunked, **generate_options)
        for i, result in enumerate(results):
            if result.dropped_tokens:
                where = "the text" if single else f"text {i}"
                warnings.warn(self.dropped_message(where, result, python=True), stacklevel=2)
        return results[0].text if single else [r.text for r in results]

    def dropped_message(self, where: str, result: Summary, python: bool) -> str:
        """The warning for a summary whose input was cut, with what to do about it (a ``python`` argument or a
        command-line flag): chunk the input, or, when chunking gave up because the chunk summaries were no shorter
        than their text, make the summaries shorter."""
        if not result.chunks:
            return (f"{where}: {result.input_tokens:,} tokens but the model reads at most "
                    f"{self.max_input_tokens:,}; dropped the last {result.dropped_tokens:,} tokens "
                    f"({'pass chunked=True' if python else 'use --chunked'} to summarize all of it)")
        flag = "max_new_tokens" if python else "--max-new-tokens"
        return (f"{where}: the summaries of its {result.chunks} chunks together were no shorter than the text, so "
                f"chunking stopped and dropped the last {result.dropped_tokens:,} tokens of those summaries; lower "
                f"{flag} well below the {self.chunk_length() - 1} text tokens of a chunk")

    def run(self, texts: Sequence[str], *, chunked: bool = False, streamer: Any = None,
            progress: Callable[[int], None] | None = None, **generate_options: Any) -> list[Summary]:
        """Summarize texts and report the details (tokens read and dropped, chunks, time) of each.

        Args:
            texts: the inputs.
            chunked: see :meth:`__call__`.
            streamer: passed to ``generate`` for the final summary of every text (texts then run one at a time,
                in order): an object with ``put(token_ids)`` / ``end()``, e.g. :class:`TextStreamer`.
            progress: called with the number of texts just finished, after each batch.
            **generate_options: see :meth:`__call__`.

        Returns:
            One :class:`Summary` per text, in input order.

        Raises:
            InputError: a text is not a string or is empty.
            GenerationError: an unknown or invalid generation option.
        """
        texts = _check_texts(texts)
        if streamer is not None and len(texts) > 1:  # one text at a time, so the stream is in input order
            return [self.run([t], chunked=chunked, streamer=streamer, progress=progress, **generate_options)[0]
                    for t in texts]
        options = self.generation_options(**generate_options)
        if chunked:
            self._check_chunk_room(options)
        rows = self.tokenizer(texts)["input_ids"]
        results: list[Summary | None] = [None] * len(texts)
        whole = [i for i, row in enumerate(rows) if not chunked or len(row) <= self.max_input_tokens]
        trimmed = [self._truncate(rows[i]) for i in whole]
        summaries, seconds = self._generate([row for row, _ in trimmed], options, streamer, progress)
        for i, (_, dropped), text, sec in zip(whole, trimmed, summaries, seconds):
            results[i] = Summary(text, len(rows[i]), dropped, 0, sec)
        for i in sorted(set(range(len(texts))) - set(whole)):
            results[i] = self._summarize_chunked(rows[i], options, streamer)
            if progress is not None:
                progress(1)
        return results  # type: ignore[return-value]

    def _truncate(self, row: list[int]) -> tuple[list[int], int]:
        """(row cut to the input limit keeping its final ``</s>``, number of tokens dropped)."""
        limit = self.max_input_tokens
        if len(row) <= limit:
            return row, 0
        return row[:limit - 1] + row[-1:], len(row) - limit

    def chunk_length(self) -> int:
        """Tokens per chunk (``</s>`` included): the largest multiple of ``block_size`` within the input limit, so
        that no encoder block of a chunk is padding; the limit itself when it is shorter than one block."""
        return _chunk_length(self.max_input_tokens, self.model.config.block_size)

    def _check_chunk_room(self, options: dict[str, Any]) -> None:
        """Refuse chunks no longer than a summary may be: chunking would not get shorter, only spend time.

        Each chunk holds ``chunk_length() - 1`` tokens of text (plus ``</s>``); its summary, up to the generation
        length limit, must be able to be shorter than that.
        """
        longest = options.get("max_new_tokens")
        if longest is None and isinstance(options.get("max_length"), int):
            longest = options["max_length"] - 1  # max_length counts the decoder start token
        if not isinstance(longest, int) or isinstance(longest, bool):  # a bad value: generate() names it
            return
        room = self.chunk_length() - 1
        if room > longest:
            return
        block = self.model.config.block_size
        # The smallest limit whose chunk holds longest + 1 text tokens plus </s> (chunks are block multiples).
        smallest = longest + 2 if longest + 2 < block else -(-(longest + 2) // block) * block
        model_limit = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        fix = (f"use max_input_tokens >= {smallest} (--max-input-tokens) or a max_new_tokens below {room}"
               if smallest <= model_limit else
               f"the model reads at most {model_limit} tokens, so use a max_new_tokens below "
               f"{_chunk_length(model_limit, block) - 1}")
        raise InputError(f"chunked summaries need chunks longer than a summary: with max_input_tokens="
                         f"{self.max_input_tokens} a chunk holds {room} tokens of text but a summary may take "
                         f"{longest} (max_new_tokens), so chunking would never get shorter; {fix}")

    def _summarize_chunked(self, row: list[int], options: dict[str, Any], streamer: Any) -> Summary:
        """Summarize block-aligned chunks, join their summaries, repeat while that is still too long."""
        start = time.perf_counter()
        eos, step = row[-1], self.chunk_length() - 1
        body, chunks = row[:-1], 0
        while len(body) + 1 > self.max_input_tokens:
            pieces = [body[i:i + step] + [eos] for i in range(0, len(body), step)]
            chunks += len(pieces)
            summaries, _ = self._generate(pieces, options, None, None)
            shorter = self.tokenizer.encode(CHUNK_SEPARATOR.join(s for s in summaries if s))[:-1]
            if len(shorter) >= len(body):  # summaries as long as their sources: stop, truncate below
                break
            body = shorter
        final, dropped = self._truncate(body + [eos])
        (text,), _ = self._generate([final], options, streamer, None)
        return Summary(text, len(row), dropped, chunks, time.perf_counter() - start)

    def _generate(self, rows: list[list[int]], options: dict[str, Any], streamer: Any,
                  progress: Callable[[int], None] | None) -> tuple[list[str], list[float]]:
        return generate_rows(self.model, self.tokenizer, rows, options, batch_size=self.batch_size,
                             streamer=streamer, progress=progress)


@torch.inference_mode()
def generate_rows(model: PegasusXForConditionalGeneration, tokenizer: Any, rows: list[list[int]],
                  options: dict[str, Any], *, batch_size: int, streamer: Any = None,
                  progress: Callable[[int], None] | None = None) -> tuple[list[str], list[float]]:
    """Generate from token-id rows in batches of similar length and decode: the one generate-and-decode loop.

    Args:
        model: the model (in eval mode), on its device.
        tokenizer: its tokenizer (``pad_token_id`` and ``batch_decode``).
        rows: input ids of each document, ``</s>`` included, any lengths.
        options: keyword arguments of ``model.generate``.
        batch_size: rows per ``generate`` call; rows are sorted longest first so padding stays small.
        streamer: passed to ``generate``; rows then run one at a time in input order (it follows one sequence).
        progress: called with the number of rows done after each batch.
    Returns:
        (decoded outputs without special tokens, stripped; seconds per row, a batch's time shared by its rows), in
        the order of ``rows``.
    """
    texts, seconds = [""] * len(rows), [0.0] * len(rows)
    if streamer is None:
        order, size = sorted(range(len(rows)), key=lambda i: -len(rows[i])), batch_size
    else:
        order, size, options = list(range(len(rows))), 1, {**options, "streamer": streamer}
    for first in range(0, len(order), size):
        batch = order[first:first + size]
        ids, mask = pad_rows([rows[i] for i in batch], tokenizer.pad_token_id, model.device)
        start = time.perf_counter()
        decoded = decode_texts(tokenizer, model.generate(ids, mask, **options))
        share = (time.perf_counter() - start) / len(batch)
        for i, text in zip(batch, decoded):
            texts[i], seconds[i] = text, share
        if progress is not None:
            progress(len(batch))
    return texts, seconds


def pad_rows(rows: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(input ids, attention mask), both ``(len(rows), longest)`` on ``device``: ``rows`` padded on the right."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    return ids, mask


def decode_texts(tokenizer: Any, sequences: Tensor) -> list[str]:
    """The text of each generated sequence ``(N, L)``: special tokens dropped, surrounding whitespace stripped."""
    return [text.strip() for text in tokenizer.batch_decode(sequences.cpu(), skip_special_tokens=True)]


def summarize(text: str | Sequence[str], *, model: str | os.PathLike | nn.Module | None = None,
              chunked: bool = False, **kwargs: Any) -> str | list[str]:
    """One-shot helper: load a :class:`Summarizer` and summarize ``text`` (keep a Summarizer for several calls).

    Args:
        text: a string or a list of strings.
        model: see :class:`Summarizer`.
        chunked: see :meth:`Summarizer.__call__`.
        **kwargs: :class:`Summarizer` arguments (``tokenizer``, ``dtype``, ``device``, ...) and generation options.

    Returns:
        The summary, or one per text.
    """
    return Summarizer(model, **kwargs)(text, chunked=chunked)


class TextStreamer:
    """Writes a summary to a text stream while ``generate`` produces it (batch of one).

    ``generate`` calls :meth:`put` with the newest token id(s) and :meth:`end` when done. Text is written up to
    the last space, because a SentencePiece piece can still change how the end of the text decodes.

    Args:
        tokenizer: decodes the ids (special tokens skipped).
        file: where to write (default ``sys.stdout``, looked up at each write).
    """

    def __init__(self, tokenizer: PegasusTokenizer, file: TextIO | None = None) -> None:
        self.tokenizer = tokenizer
        self.file = file
        self._ids: list[int] = []
        self._written = 0

    def put(self, ids: torch.Tensor) -> None:
        """Take the next token id(s) of the one sequence being generated."""
        self._ids.extend(int(i) for i in torch.as_tensor(ids).reshape(-1).tolist())
        text = self._text()
        cut = text.rfind(" ") + 1
        if cut > self._written:
            self._write(text[self._written:cut])

    def end(self) -> None:
        """Write the rest of the text and a newline; ready for the next sequence."""
        self._write(self._text()[self._written:] + "\n")
        self._ids, self._written = [], 0

    def _text(self) -> str:
        return self.tokenizer.decode(self._ids, skip_special_tokens=True).lstrip()

    def _write(self, text: str) -> None:
        out = self.file or sys.stdout
        out.write(text)
        out.flush()
        self._written += len(text)


# ---------------------------------------------------------------------- helpers
def _chunk_length(limit: int, block: int) -> int:
    return limit if limit < block else limit // block * block


def _check_option_names(options: dict[str, Any]) -> None:
    """Raise GenerationError naming any option ``generate`` does not take (or that a Summarizer decides)."""
    from .generate import OPTION_NAMES

    accepted = set(OPTION_NAMES) - _NOT_OPTIONS
    unknown = sorted(k for k in options if k not in accepted)
    if unknown:
        raise GenerationError(f"unknown generation option(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(accepted))}")


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise InputError(f"expected a str or a list of str, got {type(texts).__name__}{_bytes_hint(texts)}")
    if not texts:
        raise InputError("no texts to summarize (the list is empty)")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {i} is a {type(text).__name__}, expected a str{_bytes_hint(text)}")
        if not text.strip():
            raise InputError(f"text {i} is empty; there is nothing to summarize")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # e.g. from json.loads('"\\ud800"'); the tokenizer cannot take it
            raise InputError(f"text {i} holds the lone surrogate \\u{ord(text[exc.start]):04x} (half of a UTF-16 "
                             f"pair) at character {exc.start}, which is not text; remove it, e.g. "
                             "text.encode('utf-8', 'replace').decode()") from None
    return list(texts)


def _bytes_hint(value: Any) -> str:
    return "; decode bytes first, e.g. data.decode('utf-8')" if isinstance(value, (bytes, bytearray)) else ""


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return auto_dtype(device)[0]
    return check_dtype(dtype)


def _load_model(model: Any, dtype: torch.dtype | str | None, device: torch.device | str | None,
                quantize: str | None = None,
                kv_dtype: str | None = None) -> tuple[PegasusXForConditionalGeneration, Path | None]:
    """(model in eval mode, the folder it came from or None for a model object).

    A model object is moved or converted only when ``device`` / ``dtype`` is given; a loaded one gets the defaults.
    ``quantize``: quantize the model (a model object in place, unless it already is). ``kv_dtype``: see
    :func:`pegasus_x.quantize.set_kv_dtype` (a model object: set when given).
    """
    if isinstance(model, nn.Module):
        if not isinstance(model, PegasusXForConditionalGeneration):
            raise InputError(f"model must be a PegasusXForConditionalGeneration, got {type(model).__name__}")
        if device is not None:
            model = model.to(device=resolve_device(device))
        if dtype is not None:
            model = model.to(dtype=_resolve_dtype(dtype, model.device))
        if quantize is not None and not quantized(model):
            quantize_model(model, quantize)
        if kv_dtype is not None:
            set_kv_dtype(model, kv_dtype)
        return model.eval(), None
    if model is None:
        model = demo_model_path()
    if not isinstance(model, (str, os.PathLike)):
        raise InputError(f"model must be a folder, a hub id or a model object, got {type(model).__name__}")
    device = resolve_device(device)
    dtype = _resolve_dtype(dtype, device)  # checked before a possibly long download
    check_on_cpu(device, quantize=quantize, kv_dtype=kv_dtype)    # before a possibly long download
    folder = resolve(model)
    return PegasusXForConditionalGeneration.from_pretrained(folder, dtype=dtype, device=device, quantize=quantize,
                                                            kv_dtype=kv_dtype), folder


def _load_tokenizer(tokenizer: Any, folder: Path | None, newline_to_n: bool) -> PegasusTokenizer:
    if isinstance(tokenizer, PegasusTokenizer):
        return tokenizer
    if tokenizer is not None:
        return PegasusTokenizer.from_pretrained(tokenizer, newline_to_n=newline_to_n)
    if folder is not None and ((folder / TOKENIZER_FILE).is_file() or (folder / SPM_FILE).is_file()):
        return PegasusTokenizer.from_pretrained(folder, newline_to_n=newline_to_n)
    if folder is not None:
        warnings.warn(f"{folder} has no {TOKENIZER_FILE} or {SPM_FILE}; using the bundled PEGASUS vocabulary "
                      "(right for the released checkpoints)", stacklevel=3)
    return PegasusTokenizer.pegasus(newline_to_n=newline_to_n)
