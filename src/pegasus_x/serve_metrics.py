"""The service's counters, written in the Prometheus text exposition format (version 0.0.4) without a client library.

One :class:`Metrics` object per app; the HTTP side records requests, the batching worker records batches, tokens
and cancellations, and ``GET /metrics`` renders them. All methods are thread-safe (the worker is a thread).
"""

from __future__ import annotations

import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Request latency buckets (seconds): from a short demo-model summary to a long beam search on a 16K input.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Requests by route and status, a latency histogram, generated tokens and generation time (tokens per second),
    batches, cancellations, and the queue and running gauges (read from callables at render time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()
        self._buckets = [0] * len(LATENCY_BUCKETS)
        self._latency_sum = 0.0
        self._latency_count = 0
        self._tokens = 0
        self._generation_seconds = 0.0
        self._last_tokens_per_second = 0.0
        self._batches = 0
        self._batched_requests = 0
        self._cancelled = 0

    def request(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        with self._lock:
            self._requests[(route, status)] += 1
            self._latency_sum += seconds
            self._latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS):
                if seconds <= bound:
                    self._buckets[i] += 1

    def batch(self, requests: int, tokens: int, seconds: float) -> None:
        """Count one generated batch: its requests, the summary tokens it produced and its wall time."""
        with self._lock:
            self._batches += 1
            self._batched_requests += requests
            self._tokens += tokens
            self._generation_seconds += seconds
            if seconds > 0:
                self._last_tokens_per_second = tokens / seconds

    def cancelled(self, count: int = 1) -> None:
        """Count requests whose client went away before their summary was done."""
        with self._lock:
            self._cancelled += count

    def render(self, queue_length: int, running: int) -> str:
        """The exposition text; ``queue_length`` and ``running`` are the batcher's gauges now."""
        with self._lock:
            lines = ["# HELP pegasus_x_requests_total Requests answered, by route and HTTP status.",
                     "# TYPE pegasus_x_requests_total counter"]
            for (route, status), count in sorted(self._requests.items()):
                lines.append(f'pegasus_x_requests_total{{route="{route}",status="{status}"}} {count}')
            lines += ["# HELP pegasus_x_request_seconds Time from request to complete answer.",
                      "# TYPE pegasus_x_request_seconds histogram"]
            for bound, count in zip(LATENCY_BUCKETS, self._buckets):
                lines.append(f'pegasus_x_request_seconds_bucket{{le="{bound}"}} {count}')
            lines += [f'pegasus_x_request_seconds_bucket{{le="+Inf"}} {self._latency_count}',
                      f"pegasus_x_request_seconds_sum {self._latency_sum:.6f}",
                      f"pegasus_x_request_seconds_count {self._latency_count}"]
            lines += _single("generated_tokens_total", "counter", "Summary tokens generated.", self._tokens)
            lines += _single("generation_seconds_total", "counter", "Wall time spent generating batches.",
                             f"{self._generation_seconds:.6f}")
            lines += _single("tokens_per_second", "gauge", "Summary tokens per second of the last batch.",
                             f"{self._last_tokens_per_second:.3f}")
            lines += _single("batches_total", "counter", "Batches generated.", self._batches)
            lines += _single("batched_requests_total", "counter", "Requests generated in batches.",
                             self._batched_requests)
            lines += _single("cancelled_total", "counter", "Requests dropped because their client went away.",
                             self._cancelled)
        lines += _single("queue_length", "gauge", "Requests waiting for a batch.", queue_length)
        lines += _single("running", "gauge", "Requests in the batch being generated.", running)
        return "\n".join(lines) + "\n"


def _single(name: str, kind: str, help_text: str, value: object) -> list[str]:
    full = f"pegasus_x_{name}"
    return [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {value}"]
