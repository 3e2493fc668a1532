"""`pegasus-x serve` against live servers on 127.0.0.1 (a free port each), with the bundled demo model."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason='the serve tests need the serve extra: pip install -e ".[serve,test]"')
httpx = pytest.importorskip("httpx", reason='the serve tests need httpx: pip install -e ".[test]"')

from pegasus_x import cli  # noqa: E402
from pegasus_x.markdown import markdown_to_text  # noqa: E402
from pegasus_x.serve import ServeOptions, create_app, is_loopback  # noqa: E402
from pegasus_x.summarize import Summarizer  # noqa: E402

from _serve_helpers import live  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = (ROOT / "examples" / "sample.txt").read_text()
WORDS = SAMPLE.split()
MAX_INPUT_TOKENS = 256
MAX_INPUT_BYTES = 20_000
LONG = {"num_beams": 1, "min_new_tokens": 16000, "max_new_tokens": 16000, "no_repeat_ngram_size": 0}


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` different texts of different lengths cut from the sample document."""
    return [" ".join(WORDS[(seed + 7 * i) % 60:][:15 + 23 * i]) for i in range(n)]


@pytest.fixture(scope="module")
def summarizer():
    return Summarizer(None, max_input_tokens=MAX_INPUT_TOKENS)


@pytest.fixture(scope="module")
def url(summarizer):
    opts = ServeOptions(max_input_bytes=MAX_INPUT_BYTES, max_wait_ms=100)
    with live(create_app(summarizer, opts)) as base:
        yield base


def post(url: str, payload: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/v1/summarize", json=payload, timeout=120, **kwargs)


def metric(url: str, name: str, labels: str = "") -> float:
    """One value of ``GET /metrics``; 0 when the series is not there yet."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^pegasus_x_{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def wait_for(condition, seconds: float = 20.0) -> float:
    """Poll ``condition`` until true; returns the seconds it took (fails after ``seconds``)."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "timed out waiting"
        time.sleep(0.02)
    return time.monotonic() - start


def stream_events(url: str, payload: dict) -> list[tuple[str, dict]]:
    events = []
    with httpx.stream("POST", f"{url}/v1/summarize", json={**payload, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
    return events


def raw_request(url: str, payload: dict) -> socket.socket:
    """Send a request on a plain socket (closing it is a client going away); returns the open socket."""
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/summarize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return sock


# ---------------------------------------------------------------------------------------------------- routes
def test_healthz_and_page(url):
    health = httpx.get(f"{url}/healthz").json()
    assert health["status"] == "ok" and health["max_input_tokens"] == MAX_INPUT_TOKENS
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]  # nothing from elsewhere can load
    assert 'src="http' not in page.text and 'href="http' not in page.text
    assert 'id="summary"' in page.text


def test_summary_equals_summarizer(url, summarizer):
    text = texts(3)[2]
    answer = post(url, {"text": text, "num_beams": 2, "max_new_tokens": 20})
    assert answer.status_code == 200
    body = answer.json()
    alone = summarizer.run([text], num_beams=2, max_new_tokens=20)[0]
    assert body["summary"] == alone.text and body["summary"]
    assert body["input_tokens"] == alone.input_tokens and body["dropped_tokens"] == 0
    assert body["seconds"] > 0


def test_dropped_tokens_reported(url, summarizer):
    body = post(url, {"text": SAMPLE, "num_beams": 1}).json()
    total = len(summarizer.tokenizer.encode(SAMPLE))
    assert total > MAX_INPUT_TOKENS
    assert body["input_tokens"] == total and body["dropped_tokens"] == total - MAX_INPUT_TOKENS


@pytest.mark.parametrize("beams", [1, 3])
def test_streamed_equals_non_streamed(url, beams):
    text = texts(4)[3]
    plain = post(url, {"text": text, "num_beams": beams})
    events = stream_events(url, {"text": text, "num_beams": beams})
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
    streamed = "".join(data["text"] for kind, data in events if kind == "token")
    assert streamed == events[-1][1]["summary"] == plain.json()["summary"]
    if beams == 1:
        assert kinds.count("token") > 1  # greedy summaries arrive piece by piece


def test_metrics(url):
    before = metric(url, "requests_total", '{route="/v1/summarize",status="200"}')
    count = metric(url, "request_seconds_count")
    post(url, {"text": "A short text about joining files.", "num_beams": 1})
    assert metric(url, "requests_total", '{route="/v1/summarize",status="200"}') == before + 1
    assert metric(url, "request_seconds_count") > count
    text = httpx.get(f"{url}/metrics").text
    assert httpx.get(f"{url}/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("queue_length", "running", "tokens_per_second", "generated_tokens_total", "cancelled_total"):
        assert f"# TYPE pegasus_x_{name} " in text
    assert 'pegasus_x_request_seconds_bucket{le="+Inf"}' in text
    assert metric(url, "generated_tokens_total") > 0 and metric(url, "tokens_per_second") > 0


# ---------------------------------------------------------------------------------------------------- uploads
def test_upload_text_and_markdown(url):
    text = texts(3)[1]
    expected = post(url, {"text": text, "num_beams": 1}).json()["summary"]
    got = httpx.post(f"{url}/v1/summarize", files={"file": ("doc.txt", text.encode(), "text/plain")},
                     data={"num_beams": "1"}, timeout=60)
    assert got.status_code == 200 and got.json()["summary"] == expected
    markdown = f"# Title\n\nSome **bold** text and [a link](http://x.org).\n\n{text}\n"
    md = httpx.post(f"{url}/v1/summarize", files={"file": ("doc.md", markdown.encode(), "text/markdown")},
                    data={"num_beams": "1"}, timeout=60).json()
    assert md["summary"] == post(url, {"text": markdown_to_text(markdown), "num_beams": 1}).json()["summary"]
    assert md["input_tokens"] != post(url, {"text": markdown, "num_beams": 1}).json()["input_tokens"]


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF whose text layer is ``text`` (ASCII, no parentheses)."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_upload_pdf(url, monkeypatch):
    pytest.importorskip("pypdf", reason="PDF uploads need pypdf: pip install pypdf")
    text = "The join command joins the lines of two files on a common field"
    got = httpx.post(f"{url}/v1/summarize", files={"file": ("doc.pdf", minimal_pdf(text), "application/pdf")},
                     data={"num_beams": "1"}, timeout=60)
    assert got.status_code == 200, got.text
    assert got.json()["summary"] == post(url, {"text": text, "num_beams": 1}).json()["summary"]
    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if pypdf were not installed
    missing = httpx.post(f"{url}/v1/summarize", files={"file": ("doc.pdf", minimal_pdf(text), "application/pdf")})
    assert missing.status_code == 422 and "pip install pypdf" in missing.json()["error"]
    assert missing.json()["field"] == "file"


# ---------------------------------------------------------------------------------------------------- bad requests
BAD_JSON = [
    (b'{"text": ', 422, "body"),
    (b'["a text"]', 422, "body"),
    (b'{"text": "a", "nan": NaN}', 422, "body"),
    (b'\xff\xfe', 422, "body"),
]
BAD_FIELDS = [
    ({}, "text"),
    ({"text": ""}, "text"),
    ({"text": "   \n"}, "text"),
    ({"text": 5}, "text"),
    ({"text": "a\u0000b"}, "text"),
    ({"text": "a", "colour": 1}, "colour"),
    ({"text": "a", "pad_token_id": 3}, "pad_token_id"),
    ({"text": "a", "stream": "yes"}, "stream"),
    ({"text": "a", "num_beams": 0}, "num_beams"),
    ({"text": "a", "num_beams": 17}, "num_beams"),
    ({"text": "a", "num_beams": "4"}, "num_beams"),
    ({"text": "a", "max_new_tokens": -1}, "max_new_tokens"),
    ({"text": "a", "max_new_tokens": 10**9}, "max_new_tokens"),
    ({"text": "a", "temperature": 0}, "temperature"),
    ({"text": "a", "top_p": 2}, "top_p"),
    ({"text": "a", "early_stopping": "soon"}, "early_stopping"),
    ({"text": "a", "min_new_tokens": 9, "max_new_tokens": 5}, "min_new_tokens"),
]


def assert_clear_error(response: httpx.Response, status: int, field: str | None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body.get("field") == field
    assert body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"]


@pytest.mark.parametrize("body, status, field", BAD_JSON)
def test_bad_json(url, body, status, field):
    response = httpx.post(f"{url}/v1/summarize", content=body, headers={"content-type": "application/json"})
    assert_clear_error(response, status, field)


@pytest.mark.parametrize("payload, field", BAD_FIELDS)
def test_bad_fields(url, payload, field):
    assert_clear_error(post(url, payload), 422, field)


def test_body_limits(url):
    assert_clear_error(post(url, {"text": "word " * 40_000}), 413, "body")            # over the body limit
    assert_clear_error(post(url, {"text": "word " * (MAX_INPUT_BYTES // 5 + 1)}), 413, "text")
    big = ("word " * (MAX_INPUT_BYTES // 5 + 1)).encode()
    response = httpx.post(f"{url}/v1/summarize", files={"file": ("a.txt", big, "text/plain")})
    assert_clear_error(response, 413, "file")

    def chunks():  # no Content-Length: the limit holds while the body arrives
        for _ in range(200):
            yield b"x" * 1000
    response = httpx.post(f"{url}/v1/summarize", content=chunks(), headers={"content-type": "application/json"})
    assert_clear_error(response, 413, "body")


def test_bad_uploads(url):
    files = {"file": ("a.bin", b"\x00\x01\x02", "application/octet-stream")}
    assert_clear_error(httpx.post(f"{url}/v1/summarize", files=files), 422, "file")
    files = {"file": ("a.txt", "café".encode("latin-1"), "text/plain")}
    assert_clear_error(httpx.post(f"{url}/v1/summarize", files=files), 422, "file")
    files = {"file": ("a.pdf", b"%PDF-1.4 broken", "application/pdf")}
    if importlib.util.find_spec("pypdf"):
        assert_clear_error(httpx.post(f"{url}/v1/summarize", files=files), 422, "file")
    files = {"file": ("a.txt", b"some text", "text/plain")}
    assert_clear_error(httpx.post(f"{url}/v1/summarize", files=files, data={"text": "x"}), 422, "file")
    assert_clear_error(httpx.post(f"{url}/v1/summarize", files={"other": ("a.txt", b"x", "text/plain")}), 422,
                       "other")
    assert_clear_error(httpx.post(f"{url}/v1/summarize", files=files, data={"num_beams": "0"}), 422, "num_beams")


def test_unknown_route_and_method(url):
    assert_clear_error(httpx.get(f"{url}/v2/nothing"), 404, None)
    assert_clear_error(httpx.get(f"{url}/v1/summarize"), 405, None)


def test_model_error_is_500_and_server_keeps_serving(url, summarizer, monkeypatch):
    model = summarizer.model
    original = model.encode

    def broken(*args, **kwargs):
        monkeypatch.setattr(model, "encode", original)  # only this request fails
        raise RuntimeError("simulated failure\nwith a second line")
    monkeypatch.setattr(model, "encode", broken)
    assert_clear_error(post(url, {"text": "A text.", "num_beams": 1}), 500, None)
    assert post(url, {"text": "A text.", "num_beams": 1}).status_code == 200


# ---------------------------------------------------------------------------------------------------- batching
@pytest.mark.slow
@pytest.mark.parametrize("options", [{"num_beams": 1}, {"num_beams": 4, "max_new_tokens": 24}])
def test_concurrent_equals_sequential(url, options):
    inputs = texts(12, seed=3)
    sequential = [post(url, {"text": t, **options}).json()["summary"] for t in inputs]
    batches, batched = metric(url, "batches_total"), metric(url, "batched_requests_total")
    with ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(lambda t: post(url, {"text": t, **options}), inputs))
    assert [a.status_code for a in answers] == [200] * len(inputs)
    assert [a.json()["summary"] for a in answers] == sequential
    assert metric(url, "batched_requests_total") - batched == len(inputs)
    assert metric(url, "batches_total") - batches < len(inputs)  # some ran together


def test_sampling_runs_alone_and_repeats(url):
    options = {"do_sample": True, "seed": 7, "num_beams": 1, "top_k": 20}
    inputs = texts(4, seed=1)
    alone = [post(url, {"text": t, **options}).json()["summary"] for t in inputs]
    with ThreadPoolExecutor(4) as pool:
        together = [a.json()["summary"] for a in pool.map(lambda t: post(url, {"text": t, **options}), inputs)]
    assert together == alone


# ---------------------------------------------------------------------------------------------------- cancelling
@pytest.fixture
def solo_url(summarizer):
    """A server that runs one request at a time and queues at most one."""
    with live(create_app(summarizer, ServeOptions(max_batch_size=1, max_queue=1, max_wait_ms=0))) as base:
        yield base


def test_disconnect_cancels_running_and_queued(solo_url):
    url = solo_url
    cancelled = metric(url, "cancelled_total")
    running = raw_request(url, {"text": "A text to summarize at great length.", **LONG})
    wait_for(lambda: metric(url, "running") == 1)
    queued = raw_request(url, {"text": "Another text.", **LONG})
    wait_for(lambda: metric(url, "queue_length") == 1)
    full = post(url, {"text": "One more text.", "num_beams": 1})
    assert_clear_error(full, 503, None)
    assert int(full.headers["retry-after"]) >= 1
    queued.close()
    wait_for(lambda: metric(url, "queue_length") == 0)
    assert metric(url, "running") == 1 and metric(url, "cancelled_total") == cancelled + 1
    running.close()
    # 16,000 greedy tokens take far longer than this; the batch stops at its next step.
    assert wait_for(lambda: metric(url, "running") == 0, seconds=5) < 5
    assert metric(url, "cancelled_total") == cancelled + 2
    assert post(url, {"text": "Still serving.", "num_beams": 1}).status_code == 200


def test_disconnect_cancels_stream(solo_url):
    url = solo_url
    with httpx.stream("POST", f"{url}/v1/summarize", json={"text": "A text.", "stream": True, **LONG},
                      timeout=60) as response:
        first = next(response.iter_lines())
        assert first.startswith("event: token")
    assert wait_for(lambda: metric(url, "running") == 0, seconds=5) < 5
    assert metric(url, "cancelled_total") >= 1


@pytest.mark.slow
def test_cancelled_row_leaves_its_batch(summarizer):
    """Two requests batched together; one client goes away: its row ends, the other's summary is unchanged."""
    options = {"num_beams": 2, "min_new_tokens": 300, "max_new_tokens": 300, "no_repeat_ngram_size": 0}
    with live(create_app(summarizer, ServeOptions(max_wait_ms=3000, max_batch_size=2))) as url:
        kept_text = texts(2)[1]
        alone = post(url, {"text": kept_text, **options}).json()["summary"]
        tokens = metric(url, "generated_tokens_total")
        gone = raw_request(url, {"text": "A text that nobody waits for.", **options})
        with ThreadPoolExecutor(1) as pool:
            kept = pool.submit(post, url, {"text": kept_text, **options})
            wait_for(lambda: metric(url, "running") == 2)
            gone.close()
            assert kept.result().json()["summary"] == alone
        generated = metric(url, "generated_tokens_total") - tokens
        assert 300 <= generated < 2 * 300  # the cancelled row stopped early


# ---------------------------------------------------------------------------------------------------- API key
def test_api_key(summarizer):
    with live(create_app(summarizer, ServeOptions(api_key="s3cret"))) as url:
        for response in (httpx.get(f"{url}/healthz"), httpx.get(f"{url}/"),
                         post(url, {"text": "A text."}, headers={"authorization": "Bearer wrong"})):
            assert_clear_error(response, 401, None)
            assert response.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(f"{url}/healthz", headers={"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/", auth=("anyone", "s3cret")).status_code == 200
        assert post(url, {"text": "A text.", "num_beams": 1},
                    headers={"authorization": "Bearer s3cret"}).status_code == 200


# ---------------------------------------------------------------------------------------------------- command
def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("127.1.2.3") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")


def test_cli_refuses_before_loading(capsys, monkeypatch):
    monkeypatch.delenv("PEGASUS_X_API_KEY", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pegasus-x: error:") and "PEGASUS_X_API_KEY" in err and "\n" not in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert cli.main(["serve", "--port", str(busy.getsockname()[1])]) == 2
    assert "--port" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "port number" in capsys.readouterr().err


def test_cli_quantize_reaches_the_summarizer(monkeypatch):
    """--quantize int8 is passed to the Summarizer the service runs (the same option as summarize's)."""
    summarize_module = importlib.import_module("pegasus_x.summarize")
    seen = {}

    class Stop(Exception):
        pass

    def fake(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(summarize_module, "Summarizer", fake)
    with pytest.raises(Stop):
        cli.main(["serve", "--port", "0", "--quantize", "int8"])
    assert seen["quantize"] == "int8"
    assert cli.main(["serve", "--quantize", "int4"]) == 2


def test_cli_without_the_extra(capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "pegasus-x[serve]"' in err and "uvicorn" in err


@pytest.mark.slow
def test_sigterm_drains():
    """SIGTERM while a request runs: the request is answered in full, new connections are refused, status 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "pegasus_x", "serve", "--port", "0"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}"
        wait_for(lambda: _up(url), seconds=60)
        options = {"num_beams": 2, "min_new_tokens": 600, "max_new_tokens": 600, "no_repeat_ngram_size": 0}
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(post, url, {"text": "A text to summarize at length.", **options})
            wait_for(lambda: metric(url, "running") == 1)
            proc.send_signal(signal.SIGTERM)
            response = answer.result(timeout=120)
        assert response.status_code == 200 and response.json()["summary"]
        assert proc.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
