"""One HTTP/1.1 connection on the daemon's event loop: parsing (httptools), limits, deadlines,
keep-alive, HTTP/1.0, pipelining and backpressure.

Every connection is an ``asyncio.Protocol`` on the one loop of the server; nothing here blocks or
runs a model. Requests are answered in the order they arrived, even when a later pipelined one
finishes first: each request gets a ``Slot`` at the tail of the connection's queue, and the
queue is written out from its head as slots complete.

Deadlines (enforced by the server's sweep, four times a second, not by a timer per request):
- ``idle``: a keep-alive connection with nothing to do is closed after ``idle_timeout_s``;
- ``request``: a request's headers and body must arrive within ``request_timeout_s`` of its first
  byte (a slowloris client, a lying Content-Length): answered 408 and closed;
- ``write``: a client that stops reading its responses is closed after ``request_timeout_s``.
Over-limit input is answered at once and the connection closed without reading the rest:
headers over ``max_header_bytes`` (431), a body over its limit (413; binary and JSON bodies have
separate limits), malformed HTTP (400). Every refusal is counted by reason.

Bodies land where they are used. The connection is a ``BufferedProtocol``: the request line and
headers are read into a small scratch buffer and parsed there, and a body with a Content-Length of
``DIRECT_MIN`` bytes or more (a tensor) is then received by the kernel straight into one buffer of
exactly that size (``recv_into``), bypassing the parser: no chunk objects, no join. Binary tensors
are views of that buffer; a lone request runs on it in place, and under load each request's rows
are copied once into the forming batch (``Batcher._join``). A body is never received into a shared
batch buffer: the batch would then wait on the slowest client's upload, and every request in it
with it. The buffer is ``np.empty``: its pages are committed as bytes arrive, so announcing a large
Content-Length and sending nothing costs no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httptools
import numpy as np

from edge_runtime import __version__

if TYPE_CHECKING:
    from edge_runtime.device.http_server import HttpServer

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
    503: "Service Unavailable", 504: "Gateway Timeout",
}  # fmt: skip
SERVER = f"edgert/{__version__}".encode()
DIRECT_MIN = 64 << 10  # bodies of at least this many bytes are received in place (see the module doc)
SCRATCH_BYTES = 256 << 10  # what one read of request lines, headers and small bodies takes (asyncio's read size)


@dataclass(slots=True)
class Request:
    """A parsed request: what the API sees."""

    method: str = ""
    url: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray | bytes | memoryview = b""
    keep_alive: bool = True
    version: str = "1.1"

    @property
    def path(self) -> str:
        return self.url.split(b"?", 1)[0].decode("latin-1")

    @property
    def query(self) -> dict[str, str]:
        _, _, q = self.url.decode("latin-1").partition("?")
        return dict(p.split("=", 1) for p in q.split("&") if "=" in p)


class Slot:
    """The place of one request's response in its connection's order."""

    __slots__ = ("close", "data", "head_request", "stream")

    def __init__(self, head_request: bool) -> None:
        self.data: list[bytes] | None = None
        self.close = False
        self.head_request = head_request  # HEAD: headers only
        self.stream: Callable[[], None] | None = None  # starts a long-lived response when it is first


def response(
    status: int, body: bytes, content_type: bytes = b"application/json", *, keep_alive: bool = True,
    extra: tuple[tuple[bytes, bytes], ...] = (), http10: bool = False,
) -> list[bytes]:  # fmt: skip
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Unknown").encode()),
        b"Server: " + SERVER + b"\r\nContent-Type: " + content_type + b"\r\n",
        b"Content-Length: %d\r\n" % len(body),
    ]
    for k, v in extra:
        head.append(k + b": " + v + b"\r\n")
    if not keep_alive:
        head.append(b"Connection: close\r\n")
    elif http10:
        head.append(b"Connection: keep-alive\r\n")
    head.append(b"\r\n")
    return [b"".join(head), body] if body else [b"".join(head)]


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class HttpConnection(asyncio.BufferedProtocol):
    """One client connection. Owns its parser, its response order and its deadlines; hands complete
    requests to the server's API and never blocks the loop."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.slots: deque[Slot] = deque()
        self.req: Request | None = None  # being parsed
        self._header_bytes = 0
        self._body_limit = 0
        self._body_parts: list[bytes] = []
        self._body_len = 0
        self._scratch = memoryview(bytearray(SCRATCH_BYTES))
        # The body being received in place: its buffer and how much of it has arrived. ``_bypass``:
        # the parser stopped inside that body; the rest comes by recv_into and the parser is replaced.
        self._direct: memoryview | None = None
        self._direct_len = 0
        self._bypass = False
        self.deadline = 0.0
        self.kind = "idle"
        self.idle_since = time.monotonic()
        self.closed = False
        self._discard = False  # a refusal was queued: ignore further input, close after it is written
        self._reading_paused = False
        self._writing_paused = False
        self._on_close: list[Callable[[], None]] = []

    # --- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body may leave in separate writes: without this, Nagle's algorithm and the
            # peer's delayed ACK add ~40 ms to a response.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.server.admit(self):
            self.server.count("over_capacity")
            transport.writelines(
                response(
                    503,
                    error_body("too many connections; try again in a moment"),
                    keep_alive=False,
                    extra=((b"Retry-After", b"1"),),
                )
            )
            self.closed = True
            transport.close()
            return
        self._set_deadline("idle", self.limits.idle_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for slot in self.slots:
            slot.stream = None
        self.slots.clear()
        self.server.forget(self)
        for callback in self._on_close:
            callback()
        self._on_close.clear()

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._bypass and self._direct is not None:
            return self._direct[self._direct_len :]  # exactly the rest of the body, never past it
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._bypass:
            self._direct_len += nbytes
            if self._direct_len >= len(self._direct or b""):
                self._bypass = False
                self.parser = httptools.HttpRequestParser(self)  # the old one is still inside the body
                if not (self._discard or self.closed):
                    self.on_message_complete()
            return
        self.data_received(self._scratch[:nbytes])
        if self._direct is not None and not (self._discard or self.closed):
            self._bypass = True  # the parser returned inside a large body: receive the rest in place

    def data_received(self, data: bytes | memoryview) -> None:
        if self._discard or self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.refuse(400, "protocol upgrades are not supported", "bad_request")
        except httptools.HttpParserCallbackError:
            pass  # a callback refused the request and queued the answer
        except httptools.HttpParserError as e:
            if not self._discard:
                self.refuse(400, f"malformed HTTP request: {e}", "bad_request")

    def pause_writing(self) -> None:
        """The client is not reading: stop reading its requests too; it has a deadline to catch up."""
        self._writing_paused = True
        self._pause_reading()
        self._set_deadline("write", self.limits.request_timeout_s)

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._resume_reading()
        if self.kind == "write":
            self._after_flush()

    def eof_received(self) -> bool | None:
        # A half-closed client (shutdown(SHUT_WR)) still gets its pending answers.
        if not self.slots:
            return None  # close now
        self._discard = True
        return True

    # --- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.req = Request()
        self._header_bytes = 0
        self._body_parts, self._body_len = [], 0
        self._direct, self._direct_len = None, 0
        self._set_deadline("request", self.limits.request_timeout_s)

    def on_url(self, url: bytes) -> None:
        assert self.req is not None
        self.req.url += url
        self._count_header(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.req is not None
        self._count_header(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        # Repeated headers are joined, as RFC 9110 allows for list-valued fields; a repeated
        # Content-Length is refused by the parser itself.
        self.req.headers[key] = f"{self.req.headers[key]}, {text}" if key in self.req.headers else text

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            self.refuse(431, f"request line and headers exceed {self.limits.max_header_bytes} bytes", "too_large")
            raise httptools.HttpParserCallbackError("headers too large")

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        p = self.parser
        req.method = p.get_method().decode("latin-1")
        req.keep_alive = p.should_keep_alive()
        req.version = p.get_http_version()
        length = req.headers.get("content-length")
        chunked = "chunked" in req.headers.get("transfer-encoding", "").lower()
        binary = "inference-header-content-length" in req.headers
        self._body_limit = self.limits.max_body_bytes if binary else self.limits.max_json_bytes
        if length is not None and not chunked:
            n = int(length) if length.isdigit() else -1
            if n < 0:
                self.refuse(400, f"Content-Length {length!r} is not a number of bytes", "bad_request")
                raise httptools.HttpParserCallbackError("bad length")
            if n > self._body_limit:
                kind = "binary" if binary else "JSON"
                self.refuse(413, f"{kind} body of {n} bytes exceeds the limit of {self._body_limit}", "too_large")
                raise httptools.HttpParserCallbackError("body too large")
            if n >= DIRECT_MIN:
                self._direct = np.empty(n, np.uint8).data  # a writable memoryview of format "B"
        if req.headers.get("expect", "").lower() == "100-continue" and not self.slots and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        # Parts are kept as the parser gives them and joined once at the end (one copy; a body that
        # came in one part is used as it is). Chunked bodies are held to the same limit as they come.
        n = len(body)
        if self._direct is not None:  # the part of a large body that came with its headers
            self._direct[self._direct_len : self._direct_len + n] = body
            self._direct_len += n
            return
        if self._body_len + n > self._body_limit:
            self.refuse(413, f"chunked body exceeds the limit of {self._body_limit} bytes", "too_large")
            raise httptools.HttpParserCallbackError("body too large")
        self._body_parts.append(body)
        self._body_len += n

    def on_message_complete(self) -> None:
        req, self.req = self.req, None
        assert req is not None
        parts = self._body_parts
        if self._direct is not None:
            req.body, self._direct = self._direct, None
        elif parts:
            req.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._body_parts = []
        slot = Slot(req.method == "HEAD")
        self.slots.append(slot)
        self._set_deadline("busy", 0.0)
        if len(self.slots) >= self.limits.max_pipeline:
            self._pause_reading()  # a client pipelining without reading waits for its answers
        if not req.keep_alive:
            self._discard = True  # nothing after a request that closes the connection
        self.server.api.handle(self, slot, req)

    # --- answering ----------------------------------------------------------------------

    def complete(self, slot: Slot, data: list[bytes], close: bool = False) -> None:
        """A response is ready: write every completed response from the head of the queue."""
        slot.data = data
        slot.close = close
        self.flush()

    def flush(self) -> None:
        t = self.transport
        if t is None or self.closed:
            return
        while self.slots:
            head = self.slots[0]
            if head.stream is not None:
                start, head.stream = head.stream, None
                start()  # a long-lived response owns the connection from here
                return
            if head.data is None:
                return
            self.slots.popleft()
            t.writelines(head.data if not head.head_request else head.data[:1])
            if head.close:
                self._close()
                return
        if len(self.slots) < self.limits.max_pipeline:
            self._resume_reading()
        self._after_flush()

    def _after_flush(self) -> None:
        if self.slots or self.closed:
            return
        if self._discard:
            self._close()
        elif self.req is None:
            self._set_deadline("idle", self.limits.idle_timeout_s)
            self.idle_since = time.monotonic()

    def refuse(self, status: int, message: str, reason: str) -> None:
        """Answer a request that cannot be read (in its place after earlier pipelined answers)
        and close the connection; the rest of its input is never read."""
        self.server.count(reason)
        self._discard = True
        self.req = None
        self._pause_reading()
        slot = Slot(False)
        self.slots.append(slot)
        self.complete(slot, response(status, error_body(message), keep_alive=False), close=True)

    def expire(self, kind: str) -> None:
        """Called by the server's sweep when this connection's deadline passed."""
        self.server.count(f"{kind}_timeout")
        if kind == "request" and self.transport is not None and not self.slots:
            self.transport.writelines(response(408, error_body(
                f"request not complete within {self.limits.request_timeout_s:g} s"), keep_alive=False))  # fmt: skip
        self._close()

    def _close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.deadline = 0.0
            self.transport.close()  # buffered answers are still written first

    def abort(self) -> None:
        if self.transport is not None:
            self.closed = True
            self.transport.abort()

    def _set_deadline(self, kind: str, seconds: float) -> None:
        if self._writing_paused and kind != "write":
            return  # a client that does not read keeps its write deadline whatever else happens
        self.kind = kind
        self.deadline = time.monotonic() + seconds if seconds else 0.0

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and not self._writing_paused and not self._discard and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def readable_now(self) -> bool:
        """Whether the client has sent something not yet read (never evict such a connection)."""
        import select

        sock: Any = self.transport.get_extra_info("socket") if self.transport else None
        if sock is None:
            return False
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return True
