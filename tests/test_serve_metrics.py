"""The Prometheus text of `pegasus-x serve`'s metrics."""

from __future__ import annotations

import re

from pegasus_x.serve_metrics import LATENCY_BUCKETS, Metrics


def value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert match, f"{series} missing"
    return float(match.group(1))


def test_counters_histogram_and_gauges():
    m = Metrics()
    m.request("/v1/summarize", 200, 0.3)
    m.request("/v1/summarize", 200, 7.0)
    m.request("/v1/summarize", 422, 0.01)
    m.batch(requests=2, tokens=50, seconds=0.5)
    m.cancelled()
    text = m.render(queue_length=3, running=2)
    assert value(text, 'pegasus_x_requests_total{route="/v1/summarize",status="200"}') == 2
    assert value(text, 'pegasus_x_requests_total{route="/v1/summarize",status="422"}') == 1
    # Buckets are cumulative: each holds every request at most that long.
    assert value(text, 'pegasus_x_request_seconds_bucket{le="0.05"}') == 1
    assert value(text, 'pegasus_x_request_seconds_bucket{le="0.25"}') == 1
    assert value(text, 'pegasus_x_request_seconds_bucket{le="0.5"}') == 2
    assert value(text, 'pegasus_x_request_seconds_bucket{le="10.0"}') == 3
    assert value(text, 'pegasus_x_request_seconds_bucket{le="+Inf"}') == 3
    assert value(text, "pegasus_x_request_seconds_count") == 3
    assert abs(value(text, "pegasus_x_request_seconds_sum") - 7.31) < 1e-6
    assert value(text, "pegasus_x_tokens_per_second") == 100
    assert value(text, "pegasus_x_generated_tokens_total") == 50
    assert value(text, "pegasus_x_batched_requests_total") == 2
    assert value(text, "pegasus_x_cancelled_total") == 1
    assert value(text, "pegasus_x_queue_length") == 3 and value(text, "pegasus_x_running") == 2
    assert text.endswith("\n")
    for line in text.splitlines():  # every line a comment or "name{labels} value"
        assert line.startswith("# ") or re.fullmatch(r'pegasus_x_[a-z_]+(\{[^}]*\})? \S+', line), line
    assert text.count("pegasus_x_request_seconds_bucket{") == len(LATENCY_BUCKETS) + 1
