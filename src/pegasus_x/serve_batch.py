"""The batching queue behind ``pegasus-x serve``: requests wait briefly, then run through the model together.

One worker thread owns the model. It takes the oldest waiting request, waits up to ``max_wait`` seconds for company
(no wait when requests are already queued behind a running batch), then adds the waiting requests with the same
generation options that are closest in length, while the batch stays within ``max_batch_size`` requests,
``max_batch_rows`` decoder rows (requests × beams) and ``max_batch_tokens`` padded input tokens. Batched results equal those of each request run alone: rows of a batch
never mix (greedy, beam search and its beams are per input; padding is masked), and a sampling request, whose random
stream would depend on its neighbours, always runs alone.

A client that goes away stops costing compute: a queued request leaves the queue, and a running one is forced to
end at the next step (its row emits EOS, so generation drops it like any finished row; a batch whose rows are all
cancelled stops at once). A full queue refuses new requests (503); :meth:`Batcher.close` refuses new ones and
returns when the queued and running ones are done (SIGTERM drains).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import RequestError
from .serve_metrics import Metrics
from .summarize import decode_texts, pad_rows

logger = logging.getLogger(__name__)

# Events a job reports through its ``notify`` callable: (kind, data).
TOKEN, DONE, ERROR = "token", "done", "error"
Notify = Callable[[str, dict[str, Any]], None]


@dataclass(eq=False)
class Job:
    """One request in the queue: its input row (already cut to the model's limit) and what to tell whom.

    ``notify(kind, data)`` is called from the worker thread: ``("token", {"text"})`` for each new piece of a streamed
    summary, then either ``("done", {"summary", "input_tokens", "dropped_tokens", "seconds"})`` or
    ``("error", {"error"})``. ``seconds`` is the request's time in the service: queued and generated.
    """

    ids: list[int]
    options: dict[str, Any]
    stream: bool
    notify: Notify
    input_tokens: int
    dropped_tokens: int
    rows: int = 1       # decoder rows it takes: its beams, or its returned sequences
    submitted: float = field(default_factory=time.perf_counter)
    streamed: str = ""  # the text sent so far as token events
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> str:
        """Jobs batch together only when this is equal: the same generation options."""
        return repr(sorted(self.options.items()))

    @property
    def solo(self) -> bool:
        """A sampling job runs alone, so its random draws do not depend on other requests."""
        return bool(self.options.get("do_sample"))


def default_max_rows(model: Any) -> int | None:
    """The batch's row limit when none is given: on a CPU with the native kernels, the rows their fused decode step
    takes (past them a step runs torch's layers, and a batch of B rows costs more than B single-row steps,
    ``benchmarks/serve.py``); elsewhere none."""
    from . import native
    from .native.abi import MAX_DRAFT_ROWS

    return MAX_DRAFT_ROWS if model.device.type == "cpu" and native.available(model) else None


class _AllCancelled(Exception):
    """Every request of the running batch is gone: stop generating it."""


class Batcher:
    """The queue and its worker thread.

    Args:
        summarizer: the :class:`~pegasus_x.summarize.Summarizer` whose model, tokenizer and input limit are used.
        metrics: where batches, tokens and cancellations are counted.
        max_batch_size: requests generated together at most.
        max_batch_rows: decoder rows (requests × beams) per batch at most, or None; a request with more runs alone.
        max_batch_tokens: padded input tokens (requests × longest input) per batch at most; a longer request runs
            alone.
        max_wait: seconds the oldest request may wait for others to join its batch.
        max_queue: requests waiting at most; more are refused with 503.
    """

    def __init__(self, summarizer: Any, metrics: Metrics, *, max_batch_size: int, max_batch_tokens: int,
                 max_wait: float, max_queue: int, max_batch_rows: int | None = None) -> None:
        self.summarizer = summarizer
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_batch_rows = max_batch_rows
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._queue: list[Job] = []
        self._running: list[Job] = []
        self._closing = False
        self._last_batch_seconds = 0.0
        self._thread = threading.Thread(target=self._loop, name="pegasus-x-batcher", daemon=True)

    # ------------------------------------------------------------------ the HTTP side
    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def close(self) -> None:
        """Refuse new requests, finish the queued and running ones, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def prepare(self, text: str, options: dict[str, Any], stream: bool, notify: Notify) -> Job:
        """Tokenize a request's text (cut to the model's input limit) into a job; slow for long texts, so call it
        off the event loop."""
        from .generate import resolve_options, rows_per_input

        model = self.summarizer.model
        row = self.summarizer.tokenizer([text])["input_ids"][0]
        kept, dropped = self.summarizer._truncate(row)
        rows = rows_per_input(resolve_options(model, dict(options), model.device))
        return Job(kept, options, stream, notify, len(row), dropped, rows)

    def submit(self, job: Job) -> None:
        """Queue a job.

        Raises:
            RequestError: 503 when the queue is full or the server is shutting down.
        """
        with self._cond:
            if self._closing:
                raise RequestError("the server is shutting down; retry on another instance", status=503)
            if len(self._queue) >= self.max_queue:
                raise RequestError(f"the queue is full ({self.max_queue} requests waiting); retry later",
                                   status=503)
            self._queue.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client of ``job`` went away: drop it from the queue, or end its row in the running batch."""
        with self._cond:
            if job.cancelled.is_set():
                return
            job.cancelled.set()
            if job in self._queue:
                self._queue.remove(job)
            elif job not in self._running:
                return  # already answered
        self.metrics.cancelled()

    @property
    def queue_length(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    @property
    def running(self) -> int:
        """Requests in the batch being generated."""
        return len(self._running)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one batch."""
        return max(1, math.ceil(self._last_batch_seconds))

    # ------------------------------------------------------------------ the worker
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return  # closing, nothing left
                deadline = self._queue[0].submitted + self.max_wait
                while not self._closing and not self._batch_full() and time.perf_counter() < deadline:
                    self._cond.wait(deadline - time.perf_counter())
                batch = self._take_batch()
                self._running = batch
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._running = []

    def _most_jobs(self, first: Job) -> int:
        """Jobs like ``first`` a batch may hold (at least 1)."""
        rows_limit = self.max_batch_size if self.max_batch_rows is None else self.max_batch_rows // first.rows
        return max(1, min(self.max_batch_size, rows_limit))

    def _batch_full(self) -> bool:
        first = self._queue[0]
        return first.solo or sum(job.key == first.key for job in self._queue) >= self._most_jobs(first)

    def _take_batch(self) -> list[Job]:
        """The oldest job and the same-option jobs nearest to it in length, within the batch limits."""
        first = self._queue[0]
        batch, width, most = [first], len(first.ids), self._most_jobs(first)
        if not first.solo:
            peers = [job for job in self._queue[1:] if job.key == first.key]
            peers.sort(key=lambda job: abs(len(job.ids) - len(first.ids)))  # stable: older first among equals
            for job in peers:
                wider = max(width, len(job.ids))
                if len(batch) < most and wider * (len(batch) + 1) <= self.max_batch_tokens:
                    batch.append(job)
                    width = wider
        for job in batch:
            self._queue.remove(job)
        return batch

    def _run(self, batch: list[Job]) -> None:
        """Generate a batch and answer its jobs; any failure answers them with an error and the worker goes on."""
        jobs = [job for job in batch if not job.cancelled.is_set()]
        if not jobs:
            return
        try:
            self._answer(jobs)
        except _AllCancelled:
            pass
        except Exception as exc:  # a model failure answers its requests with 500; the server keeps serving
            message = " ".join(f"the model failed on this request ({type(exc).__name__}: {exc})".split())
            logger.exception("a batch of %d request(s) failed: %s", len(jobs), message)
            for job in jobs:
                job.notify(ERROR, {"error": message})

    def _answer(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        sequences = self._generate(jobs)
        seconds = time.perf_counter() - start
        self._last_batch_seconds = seconds
        pad = self.summarizer.tokenizer.pad_token_id
        self.metrics.batch(len(jobs), int((sequences[:, 1:] != pad).sum()), seconds)
        texts = decode_texts(self.summarizer.tokenizer, sequences)
        now = time.perf_counter()
        for job, summary in zip(jobs, texts):
            if job.cancelled.is_set():
                continue
            if job.stream and summary.startswith(job.streamed) and len(summary) > len(job.streamed):
                _send(job, summary[len(job.streamed):])  # the rest (all of it after beam search)
            job.notify(DONE, {"summary": summary, "input_tokens": job.input_tokens,
                              "dropped_tokens": job.dropped_tokens, "seconds": round(now - job.submitted, 3)})

    @torch.inference_mode()
    def _generate(self, jobs: list[Job]) -> Tensor:
        """``generate``'s steps for a batch of jobs with equal options, plus the cancellation rule and streaming.

        Returns:
            ``(len(jobs), L)`` token ids, starting with the decoder start token.
        """
        from .generate import resolve_options, search, start_cache

        model, tokenizer = self.summarizer.model, self.summarizer.tokenizer
        options = dict(jobs[0].options)
        opts = resolve_options(model, options, model.device)
        if opts.num_beams == 1 and any(job.stream for job in jobs):  # beam hypotheses change until the end
            options["streamer"] = _Streamers(jobs, tokenizer, opts.eos)
            opts = resolve_options(model, options, model.device)
        ids, mask = pad_rows([job.ids for job in jobs], tokenizer.pad_token_id, model.device)
        encoded = model.encode(ids, mask, skip_padding=True)
        keep = encoded.attention_mask
        cache = start_cache(model, encoded.last_hidden_state, keep, opts)
        del encoded
        return search(model, cache, keep, ids, opts, [_cancel_processor(jobs, opts.eos)]).sequences


def _cancel_processor(jobs: list[Job], eos: tuple[int, ...]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A logits processor (run last) that ends the rows of cancelled jobs: only EOS stays possible, so the search
    treats them as finished and drops them from the batch; raises :class:`_AllCancelled` when no job is left."""

    def apply(scores: Tensor, history: Tensor, row_inputs: Tensor) -> Tensor:
        gone = [job.cancelled.is_set() for job in jobs]
        if not any(gone):
            return scores
        active = set(row_inputs.tolist())
        if all(gone[i] for i in active) or not eos:
            raise _AllCancelled
        rows = torch.tensor(gone, device=scores.device)[row_inputs]
        forced = torch.full_like(scores, -math.inf)
        forced[:, eos[0]] = 0.0
        return torch.where(rows[:, None], forced, scores)
    return apply


class _Streamers:
    """``generate``'s streamer for a batch: sends each streaming job's summary as it grows, up to the last space
    followed by text, because a SentencePiece piece can still change how the end of the text decodes (as in
    :class:`~pegasus_x.summarize.TextStreamer`). The rest is sent with the final summary."""

    def __init__(self, jobs: list[Job], tokenizer: Any, eos: tuple[int, ...]) -> None:
        self.jobs, self.tokenizer, self.eos = jobs, tokenizer, eos
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.ended = [not job.stream for job in jobs]

    def __call__(self, tokens: Tensor) -> None:
        """Take one step's new token of every row ``(len(jobs),)`` (pad for finished rows)."""
        for i, token in enumerate(tokens.tolist()):
            job = self.jobs[i]
            if self.ended[i] or job.cancelled.is_set():
                continue
            if token in self.eos:
                self.ended[i] = True
                continue
            self.ids[i].append(token)
            text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True).strip()
            cut = text.rfind(" ") + 1
            if cut > len(job.streamed) and text.startswith(job.streamed):
                _send(job, text[len(job.streamed):cut])


def _send(job: Job, piece: str) -> None:
    """Send the next ``piece`` of a streamed summary (the pieces joined are the summary)."""
    job.streamed += piece
    job.notify(TOKEN, {"text": piece})
