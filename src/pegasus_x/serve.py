"""`pegasus-x serve`: a summarization service (Starlette app, served by uvicorn) and its web page.

Routes: ``POST /v1/summarize`` (JSON or a multipart form with a file; ``"stream": true`` answers with server-sent
events), ``GET /`` (the page, :file:`assets/page/index.html`), ``GET /healthz``, ``GET /metrics`` (Prometheus text).
Requests are checked by :mod:`pegasus_x.serve_requests`, batched by :mod:`pegasus_x.serve_batch` and counted by
:mod:`pegasus_x.serve_metrics`. Every answer that is not a summary is JSON ``{"error": ..., "field": ...}`` with one
line of text, never a traceback.

The service listens on the loopback interface unless told otherwise; any other address needs an API key
(``--api-key`` or ``PEGASUS_X_API_KEY``), and then every request must carry it (``Authorization: Bearer KEY``, or
HTTP Basic auth with the key as password, which is how a browser asks for it on the page). Starlette and uvicorn
are the optional extra ``pegasus-x[serve]``, imported only when the command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import importlib.util
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .documents import MAX_INPUT_BYTES
from .errors import InputError, RequestError

logger = logging.getLogger(__name__)
API_KEY_ENV = "PEGASUS_X_API_KEY"
EXTRA_HINT = 'pip install "pegasus-x[serve]"'
_EXTRA = {"starlette": "starlette", "uvicorn": "uvicorn", "multipart": "python-multipart"}  # module: package
ROUTES = ("/", "/healthz", "/metrics", "/v1/summarize")
# Room in a request body beyond the text itself: JSON syntax, options, multipart headers.
BODY_OVERHEAD = 64 * 1024
CLIENT_GONE = 499  # the status recorded (never sent) for a request whose client went away, as nginx logs it
_PAGE_HEADERS = {
    # Everything the page needs is inline or from this server: no CDN, works offline.
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "x-content-type-options": "nosniff",
}


@dataclass
class ServeOptions:
    """What `pegasus-x serve` was asked to do; the fields' defaults are the command's."""

    model: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str | None = None
    quantize: str | None = None
    kv_dtype: str | None = None
    device: str | None = None
    api_key: str | None = None
    max_input_tokens: int | None = None
    max_input_bytes: int = MAX_INPUT_BYTES
    max_batch_size: int = 16
    max_batch_rows: int | None = None      # None: serve_batch.default_max_rows
    max_batch_tokens: int = 65536
    max_wait_ms: float = 10.0
    max_queue: int = 256

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        return cls(model=args.model, host=args.host, port=args.port,
                   dtype=None if args.dtype == "auto" else args.dtype, quantize=args.quantize,
                   kv_dtype=args.kv_dtype, device=args.device,
                   api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
                   max_input_tokens=args.max_input_tokens, max_input_bytes=args.max_input_bytes,
                   max_batch_size=args.max_batch_size, max_batch_rows=args.max_batch_rows,
                   max_batch_tokens=args.max_batch_tokens,
                   max_wait_ms=args.max_wait_ms, max_queue=args.max_queue)


# ---------------------------------------------------------------------------------------------------- command
def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    from .cli import _positive_int, add_model_arguments

    d = ServeOptions()
    p = subparsers.add_parser(
        "serve", help="run a summarization service with a web page (needs pegasus-x[serve])",
        description="Serve POST /v1/summarize, a web page at /, /healthz and /metrics. Concurrent requests are "
                    "batched; SIGTERM finishes the requests in flight, then exits.")
    p.add_argument("--model", metavar="DIR|HUB_ID", help="checkpoint folder or hub id (default: the bundled demo "
                   "model)")
    p.add_argument("--host", default=d.host, help="address to listen on (default: %(default)s; any other than "
                   f"loopback needs --api-key or {API_KEY_ENV})")
    p.add_argument("--port", type=_port, default=d.port, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", help=f"key every request must send (default: ${API_KEY_ENV}, "
                   "which keeps it out of the process list)")
    add_model_arguments(p)
    p.add_argument("--max-input-tokens", type=_positive_int, metavar="N", help="read at most N tokens of each "
                   "text, reporting the rest as dropped (default: what the model takes)")
    p.add_argument("--max-input-bytes", type=_positive_int, default=d.max_input_bytes, metavar="N",
                   help="longest text or file accepted, in bytes (default: %(default)s, 8 MiB); larger: 413")
    p.add_argument("--max-batch-size", type=_positive_int, default=d.max_batch_size, metavar="N",
                   help="requests generated together at most (default: %(default)s; 1 turns batching off)")
    p.add_argument("--max-batch-rows", type=_positive_int, metavar="N",
                   help="decoder rows (requests x beams) per batch at most; a request with more runs alone "
                        "(default: on a CPU with the native kernels, the rows their fused step takes; else no limit)")
    p.add_argument("--max-batch-tokens", type=_positive_int, default=d.max_batch_tokens, metavar="N",
                   help="padded input tokens per batch at most (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, metavar="MS",
                   help="how long a request may wait for others to batch with (default: %(default)s)")
    p.add_argument("--max-queue", type=_positive_int, default=d.max_queue, metavar="N",
                   help="requests waiting at most; more are answered 503 (default: %(default)s)")
    p.set_defaults(func=lambda args: run_serve(ServeOptions.from_args(args)))


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}")
    return port


def run_serve(opts: ServeOptions) -> int:
    """`pegasus-x serve`: check, bind, load the model, serve until SIGTERM or Ctrl-C.

    Raises:
        InputError: the serve extra is missing, a non-loopback address without an API key, a port that cannot be
            bound, a bad option.
        CheckpointError: the model cannot be loaded.
    """
    missing = [package for module, package in _EXTRA.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise InputError(f"pegasus-x serve needs {', '.join(missing)}: {EXTRA_HINT}")
    import uvicorn

    from .summarize import Summarizer

    if not 0 <= opts.max_wait_ms <= 10_000:
        raise InputError(f"--max-wait-ms must be between 0 and 10000, got {opts.max_wait_ms}")
    if not is_loopback(opts.host) and not opts.api_key:
        raise InputError(f"--host {opts.host} is reachable from other machines: set an API key with "
                         f"{API_KEY_ENV}=... (or --api-key), or keep the default --host 127.0.0.1")
    sock = bind(opts.host, opts.port)  # before the (slow) model load: a busy port fails at once
    try:
        summarizer = Summarizer(opts.model, dtype=opts.dtype, quantize=opts.quantize, kv_dtype=opts.kv_dtype,
                                device=opts.device, max_input_tokens=opts.max_input_tokens)
        app = create_app(summarizer, opts)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="on"))
        host, port = sock.getsockname()[:2]
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
        logger.info("serving %s on %s (Ctrl-C or SIGTERM stops it)", opts.model or "the demo model", url)
        # uvicorn re-raises a SIGTERM after draining; with this handler restored then, that ends with status 0.
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
    return 0


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (only this machine can connect)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (port 0: a free one), for uvicorn to listen on.

    Raises:
        InputError: the address cannot be resolved or bound (in use, not this machine's, no permission).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise InputError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = "; pick another with --port (0: any free port)" if exc.errno == 98 else ""
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    sock.set_inheritable(True)
    return sock


# ---------------------------------------------------------------------------------------------------- the app
def create_app(summarizer: Any, opts: ServeOptions | None = None) -> Any:
    """The service as a Starlette app (an ASGI callable) around a loaded :class:`~pegasus_x.summarize.Summarizer`.

    Its lifespan starts the batching worker and, at shutdown, lets it finish the queued and running requests.

    Args:
        summarizer: the model, tokenizer, input limit and generation defaults to serve.
        opts: limits, batching and the API key (defaults: :class:`ServeOptions`' own).
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from . import serve_requests
    from .serve_batch import DONE, TOKEN, Batcher, default_max_rows
    from .serve_metrics import CONTENT_TYPE, Metrics

    opts = opts or ServeOptions()
    metrics = Metrics()
    rows = opts.max_batch_rows if opts.max_batch_rows is not None else default_max_rows(summarizer.model)
    batcher = Batcher(summarizer, metrics, max_batch_size=opts.max_batch_size, max_batch_rows=rows,
                      max_batch_tokens=opts.max_batch_tokens, max_wait=opts.max_wait_ms / 1000,
                      max_queue=opts.max_queue)
    page = resources.files(__package__).joinpath("assets", "page", "index.html").read_bytes()
    body_limit = opts.max_input_bytes + BODY_OVERHEAD
    model_name = opts.model or "demo"

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, "queue_length": batcher.queue_length,
                             "max_input_tokens": summarizer.max_input_tokens})

    async def metrics_route(request: Request) -> Response:
        return PlainTextResponse(metrics.render(batcher.queue_length, batcher.running), media_type=CONTENT_TYPE)

    async def summarize(request: Request) -> Any:
        try:
            body = await _read_body(request, body_limit, opts.max_input_bytes)
            media = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if media == "multipart/form-data":
                fields, upload = await _read_form(request, body, body_limit)
                parsed = serve_requests.from_form(fields, upload, summarizer, opts.max_input_bytes)
            else:  # JSON, whatever the header says (curl -d sends a form type)
                parsed = serve_requests.from_json(body, summarizer, opts.max_input_bytes)
            events: asyncio.Queue = asyncio.Queue()
            notify = _threadsafe_put(asyncio.get_running_loop(), events)
            job = await run_in_threadpool(batcher.prepare, parsed.text, parsed.options, parsed.stream, notify)
            batcher.submit(job)
        except RequestError as exc:
            headers = {"retry-after": str(batcher.retry_after())} if exc.status == 503 else None
            return _error(exc.status, str(exc), exc.field, headers)
        if parsed.stream:
            return _EventStream(job, events, batcher, TOKEN)
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            event = await _next_event(events, watcher)
        finally:
            watcher.cancel()
        if event is None:
            batcher.cancel(job)
            return Response(status_code=CLIENT_GONE)
        kind, data = event
        return JSONResponse(data) if kind == DONE else _error(500, data["error"])

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = f"no route {request.url.path}; routes: GET /, /healthz, /metrics; POST /v1/summarize"
        return _error(status, message)

    async def crashed(request: Request, exc: Exception) -> Response:
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close)  # uvicorn has waited for the requests in flight

    app = Starlette(routes=[Route("/", index), Route("/healthz", healthz), Route("/metrics", metrics_route),
                            Route("/v1/summarize", summarize, methods=["POST"])],
                    exception_handlers={HTTPException: not_found, Exception: crashed}, lifespan=lifespan)
    return _Guard(app, opts.api_key, metrics)


def _error(status: int, message: str, field: str | None = None, headers: dict[str, str] | None = None) -> Any:
    """The JSON answer of a request that gets no summary: one line of text, and the field at fault if any."""
    from starlette.responses import JSONResponse

    content: dict[str, Any] = {"error": " ".join(message.split())}
    if field is not None:
        content["field"] = field
    return JSONResponse(content, status_code=status, headers=headers)


async def _read_body(request: Any, limit: int, max_input_bytes: int) -> bytes:
    """The request body, refused (413) as soon as it is longer than ``limit``: declared or received."""
    too_large = RequestError(f"the request body is larger than this server takes ({max_input_bytes:,} bytes of "
                             "text plus room for the options; --max-input-bytes)", status=413, field="body")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    pieces, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise too_large
        pieces.append(piece)
    return b"".join(pieces)


async def _read_form(request: Any, body: bytes, limit: int) -> tuple[dict[str, str], tuple[str, str, bytes] | None]:
    """(text fields, the ``file`` upload as (name, content type, bytes) or None) of a multipart body."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    fields: dict[str, str] = {}
    upload = None
    try:
        async with Request(request.scope, replay).form(max_files=1, max_fields=64, max_part_size=limit) as form:
            for name, value in form.multi_items():
                if name in fields or (upload is not None and name == "file"):
                    raise RequestError(f"the field {name!r} is given twice", field=name)
                if isinstance(value, UploadFile):
                    if name != "file":
                        raise RequestError(f"a file upload must be the field 'file', got {name!r}", field=name)
                    upload = (value.filename or "", (value.content_type or "").lower(), await value.read())
                else:
                    fields[name] = value
    except (MultiPartException, HTTPException) as exc:
        raise RequestError(f"the multipart form is malformed: {getattr(exc, 'detail', None) or exc}",
                           field="body") from None
    return fields, upload


def _threadsafe_put(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Any:
    """A notify callable for the worker thread that puts each event on ``events`` in the event loop."""

    def notify(kind: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(events.put_nowait, (kind, data))
    return notify


async def _disconnected(receive: Any) -> None:
    """Returns when the client has gone away (the body has been read, so only ``http.disconnect`` can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _next_event(events: asyncio.Queue, watcher: asyncio.Future) -> tuple[str, dict[str, Any]] | None:
    """The job's next event, or None when the client went away first."""
    getter = asyncio.ensure_future(events.get())
    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


class _EventStream:
    """A streamed answer (ASGI): ``event: token`` with ``{"text"}`` per new piece of the summary (the pieces joined
    are the summary), then ``event: done`` (the JSON answer) or ``event: error``. A client that goes away cancels
    the job."""

    def __init__(self, job: Any, events: asyncio.Queue, batcher: Any, token_kind: str) -> None:
        self.job, self.events, self.batcher, self.token_kind = job, events, batcher, token_kind

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            while True:
                event = await _next_event(self.events, watcher)
                if event is None:
                    self.batcher.cancel(self.job)
                    return
                kind, data = event
                text = json.dumps(data, ensure_ascii=False)
                await send({"type": "http.response.body", "body": f"event: {kind}\ndata: {text}\n\n".encode(),
                            "more_body": True})
                if kind != self.token_kind:
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except BaseException:
            self.batcher.cancel(self.job)
            raise
        finally:
            watcher.cancel()


class _Guard:
    """ASGI middleware: the API key check (401) and the request counters (route, status, latency)."""

    def __init__(self, app: Any, api_key: str | None, metrics: Any) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), CLIENT_GONE

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key is not None and not _authorized(scope, self.api_key):
                response = _error(401, "this server needs its API key: send 'Authorization: "
                                  "Bearer KEY' (on the page, your browser asks: any user name, the key as "
                                  "password)", headers={"www-authenticate": 'Basic realm="pegasus-x", '
                                                                             'charset="UTF-8"'})
                await response(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label values
            self.metrics.request(route, status, time.perf_counter() - start)


def _authorized(scope: Any, key: str) -> bool:
    """Whether the request carries ``key``: ``Authorization: Bearer KEY`` or Basic auth with it as the password."""
    headers = {name.lower(): value for name, value in scope["headers"]}
    scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    given = ""
    if scheme.lower() == "bearer":
        given = value.strip()
    elif scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            given = ""
    return hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8"))
