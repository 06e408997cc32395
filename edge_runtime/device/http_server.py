"""The daemon's HTTP API: Open Inference Protocol v2 on loopback TCP and/or a unix socket,
plus /metrics in the Prometheus text format.

The standard library's threaded HTTP server, one thread per connection with keep-alive and
a cap on connections: no framework on the device, and every request ends in a thread that
waits on the model's batcher anyway. Errors are JSON ``{"error": "..."}`` with the status
the protocol's clients expect: 400 bad input, 404 unknown model, 413 too large, 429 queue
full, 503 not ready or shutting down, 504 timed out in the queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from edge_runtime import __version__
from edge_runtime.contracts.oip import HEADER_LENGTH, NUMPY_TO_OIP, ProtocolError, decode_request, encode_response
from edge_runtime.serving.batcher import BatcherClosedError, QueueFullError, RequestTimeoutError
from edge_runtime.serving.results import ResultHub
from edge_runtime.serving.runtime import ModelNotFoundError, Runtime
from edge_runtime.serving.tensors import InputError

log = logging.getLogger(__name__)


REFUSAL_REASONS = {400: "bad_request", 404: "not_found", 411: "length_required", 413: "too_large",
                   429: "queue_full", 503: "not_ready", 504: "timeout"}  # fmt: skip


class Reaper:
    """Deadlines for connections, enforced by one thread: a connection idle past its keep-alive
    timeout, or one whose request (headers and body) is not complete by its deadline (a slowloris
    client, a lying Content-Length), is shut down. Per-recv socket timeouts cannot do this: a
    client sending a byte a second never trips them."""

    def __init__(self, on_expired: Callable[[str], None]) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[socket.socket, tuple[float, str]] = {}
        self._on_expired = on_expired
        self._thread = threading.Thread(target=self._loop, name="http-reaper", daemon=True)
        self._thread.start()

    def watch(self, sock: socket.socket, seconds: float, kind: str) -> None:
        with self._lock:
            self._deadlines[sock] = (time.monotonic() + seconds, kind)

    def unwatch(self, sock: socket.socket) -> None:
        with self._lock:
            self._deadlines.pop(sock, None)

    def evict_idle(self) -> bool:
        """Make room at the connection cap: close the keep-alive connection idle the longest."""
        with self._lock:
            idle = [(d, s) for s, (d, kind) in self._deadlines.items() if kind == "idle"]
            if not idle:
                return False
            _, sock = min(idle, key=lambda x: x[0])
            self._deadlines.pop(sock, None)
        _shutdown(sock)
        self._on_expired("evicted_idle")
        return True

    def _loop(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                expired = [(s, kind) for s, (d, kind) in self._deadlines.items() if d <= now]
                for s, _ in expired:
                    self._deadlines.pop(s, None)
            for sock, kind in expired:
                _shutdown(sock)
                self._on_expired(f"{kind}_timeout")


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed by the peer or the handler
        sock.shutdown(socket.SHUT_RDWR)


class ServerState:
    def __init__(
        self,
        runtime: Runtime,
        max_body_bytes: int,
        hub: ResultHub | None = None,
        max_json_bytes: int = 8 << 20,
        idle_timeout_s: float = 15.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.runtime = runtime
        self.hub = hub or ResultHub()
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = min(max_json_bytes, max_body_bytes)
        self.idle_timeout_s, self.request_timeout_s = idle_timeout_s, request_timeout_s
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.refused = runtime.metrics.registry.counter(
            "edgert_http_refused_total", "HTTP requests and connections refused or cut, by reason", ("reason",)
        )
        self.reaper = Reaper(lambda reason: self.refused.inc(reason=reason))


def model_metadata(runtime: Runtime, name: str, version: str | None) -> dict[str, Any]:
    handle = runtime.get(name, version)
    m = handle.manifest

    def tensors(specs: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "datatype": NUMPY_TO_OIP.get(t.dtype, t.dtype),
                "shape": [d if isinstance(d, int) else -1 for d in t.shape],
            }
            for t in specs
        ]

    return {
        "name": m.name,
        "versions": [m.version],
        "platform": "onnxruntime_onnx" if m.runtime == "onnxruntime" else "tensorflow_lite",
        "inputs": tensors(m.inputs),
        "outputs": tensors(m.outputs),
        "parameters": {
            "target": m.target,
            "precision": m.precision,
            "labels": m.labels,
            "max_batch": handle.settings.max_batch,
            "providers": handle.current.backend.active_providers,
        },
    }


class Handler(BaseHTTPRequestHandler):
    """One HTTP connection of the daemon's API (Open Inference Protocol v2, health, metrics, SSE).

    Owns parsing and answering; validation errors are 4xx with a message naming what was wrong.
    Never runs a model itself: requests go to the Runtime's batchers."""

    protocol_version = "HTTP/1.1"
    server_version = f"edgert/{__version__}"
    state: ServerState  # set on the subclass made per server

    def handle_one_request(self) -> None:
        """Wait for the next request of this connection under the keep-alive idle deadline, then
        read it under the request deadline (both enforced by the reaper)."""
        reaper, sock = self.state.reaper, self.request
        reaper.watch(sock, self.state.idle_timeout_s, "idle")
        try:
            first = self.rfile.peek(1)  # type: ignore[attr-defined]  # a BufferedReader
        except OSError:
            first = b""
        if not first:
            reaper.unwatch(sock)
            self.close_connection = True
            return
        reaper.watch(sock, self.state.request_timeout_s, "request")
        try:
            super().handle_one_request()
        finally:
            reaper.unwatch(sock)

    def setup(self) -> None:
        super().setup()
        if self.request.family in (socket.AF_INET, socket.AF_INET6):
            # Headers and body leave in separate writes: without this, Nagle's algorithm and
            # the peer's delayed ACK add ~40 ms to every response.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "uds"

    # --- responses -------------------------------------------------------------------

    def _send(
        self, status: int, body: bytes, content_type: str = "application/json", headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.state.stopping.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        self._send(status, json.dumps(doc).encode())

    def _error(self, status: int, message: str) -> None:
        self.state.refused.inc(reason=REFUSAL_REASONS.get(status, str(status)))
        self._json(status, {"error": message})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (malformed request line, oversized headers) are counted too."""
        self.state.refused.inc(reason=REFUSAL_REASONS.get(code, str(code)))
        super().send_error(code, message, explain)

    # --- routing ---------------------------------------------------------------------

    def do_GET(self) -> None:
        self.state.reaper.unwatch(self.request)  # headers are in; a stream may stay open for long
        path = self.path.split("?", 1)[0].rstrip("/")
        rt = self.state.runtime
        if path == "/v2/health/live":
            self._json(200, {"live": True})
        elif path == "/v2/health/ready":
            ok = self.state.ready.is_set() and not self.state.stopping.is_set()
            self._json(200 if ok else 503, {"ready": ok})
        elif path == "/v2":
            self._json(200, {"name": "edgert", "version": __version__, "extensions": ["binary_tensor_data"]})
        elif path == "/v2/stream":
            self._stream()
        elif path == "/metrics":
            self._send(200, rt.metrics.registry.render().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path.startswith("/v2/models/"):
            name, version, rest = _parse_model_path(path)
            try:
                if rest == "ready":
                    rt.get(name, version)
                    self._json(200, {"name": name, "ready": self.state.ready.is_set()})
                elif rest == "":
                    self._json(200, model_metadata(rt, name, version))
                else:
                    self._error(404, f"no such endpoint: {self.path}")
            except ModelNotFoundError as e:
                self._error(404, str(e))
        else:
            self._error(404, f"no such endpoint: {self.path}")

    do_HEAD = do_GET

    def _stream(self) -> None:
        """Server-Sent Events: one `data:` JSON line per frame result, until the client goes."""
        query = dict(p.split("=", 1) for p in self.path.partition("?")[2].split("&") if "=" in p)
        wanted = query.get("source")
        sub = self.state.hub.subscribe()
        self.close_connection = True
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b": edgert results stream\n\n")
            self.wfile.flush()
            last = time.monotonic()
            while not self.state.stopping.is_set():
                result = sub.get(timeout=0.5)
                if result is None:
                    if time.monotonic() - last > 15:
                        self.wfile.write(b": keep-alive\n\n")  # proxies and clients see the stream is alive
                        self.wfile.flush()
                        last = time.monotonic()
                    continue
                if wanted and result.get("source") != wanted:
                    continue
                self.wfile.write(b"event: result\ndata: " + json.dumps(result).encode() + b"\n\n")
                self.wfile.flush()
                last = time.monotonic()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            sub.close()

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if not path.startswith("/v2/models/"):
            self._drain_body()
            self._error(404, f"no such endpoint: {self.path}")
            return
        name, version, rest = _parse_model_path(path)
        if rest != "infer":
            self._drain_body()
            self._error(404, f"no such endpoint: {self.path}")
            return
        body = self._read_body()
        self.state.reaper.unwatch(self.request)
        if body is None:
            return
        if self.state.stopping.is_set() or not self.state.ready.is_set():
            self._error(503, "server is not ready (starting or shutting down)")
            return
        self._infer(name, version, body)

    def _drain_body(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= self.state.max_body_bytes:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            self._error(411, "chunked bodies are not supported; send Content-Length")
            return None
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(411, "Content-Length header required")
            return None
        n = int(length)
        # JSON bodies cost ~4x their size to parse into tensors; binary ones are read into arrays
        # as they are: JSON gets the smaller limit.
        limit = self.state.max_body_bytes if self.headers.get(HEADER_LENGTH) else self.state.max_json_bytes
        if n > limit:
            self.close_connection = True  # do not read it: the socket is dropped after the reply
            kind = "binary" if limit == self.state.max_body_bytes else "JSON"
            self._error(413, f"{kind} body of {n} bytes exceeds the limit of {limit}")
            return None
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            return None
        return body

    def _infer(self, name: str, version: str | None, body: bytes) -> None:
        rt = self.state.runtime
        try:
            header = self.headers.get(HEADER_LENGTH)
            header_len = int(header) if header is not None else None
            request, feeds = decode_request(body, header_len)
            timeout = (request.get("parameters") or {}).get("timeout_ms")
            timeout_ms = float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None
            submitted = rt.submit(name, feeds, version, timeout_ms)
            outputs = submitted.result(timeout=(timeout_ms or rt.batching.timeout_ms) / 1000.0 + 30.0)
            out_body, out_header = encode_response(name, submitted.version, request, outputs)
        except ModelNotFoundError as e:
            self._error(404, str(e))
        except (ProtocolError, InputError, ValueError) as e:
            self._error(400, str(e))
        except QueueFullError as e:
            self._error(429, str(e))
        except (RequestTimeoutError, FutureTimeout) as e:
            self._error(504, str(e) or "request timed out")
        except BatcherClosedError as e:
            self._error(503, str(e))
        except Exception as e:  # the model itself failed: report, keep serving
            log.exception("inference on %s failed", name)
            self._error(500, f"model {name!r} failed: {type(e).__name__}: {e}")
        else:
            headers = {HEADER_LENGTH: str(out_header)} if out_header is not None else None
            ctype = "application/octet-stream" if out_header is not None else "application/json"
            self._send(200, out_body, ctype, headers)


def _parse_model_path(path: str) -> tuple[str, str | None, str]:
    parts = path.split("/")[3:]  # after "", "v2", "models"
    name = parts[0] if parts else ""
    version = None
    rest = parts[1:]
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
    return name, version, "/".join(rest)


class _BoundedThreadingMixIn(socketserver.ThreadingMixIn):
    """One thread per connection, at most max_connections at once (memory stays flat)."""

    daemon_threads = True
    block_on_close = False
    slots: threading.BoundedSemaphore

    state: ServerState

    def process_request(self, request: Any, client_address: Any) -> None:
        """Never blocks the accept loop: at the cap, the longest-idle keep-alive connection makes
        room; if none is idle, the new client is answered 503 at once and closed."""
        if not self.slots.acquire(blocking=False) and not (
            self.state.reaper.evict_idle() and self.slots.acquire(timeout=0.5)
        ):
            self.state.refused.inc(reason="over_capacity")
            _busy(request)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b'Retry-After: 1\r\nContent-Length: 56\r\n\r\n{"error": "too many connections; try again in a moment"}'
)


def _busy(request: socket.socket) -> None:
    try:
        request.settimeout(0.5)
        request.sendall(BUSY)
    except OSError:
        pass


class TCPServer(_BoundedThreadingMixIn, ThreadingHTTPServer):
    pass


class UnixServer(_BoundedThreadingMixIn, socketserver.UnixStreamServer):
    def get_request(self) -> tuple[socket.socket, Any]:
        request, _ = super().get_request()
        return request, ("uds", 0)


def make_servers(
    state: ServerState, host: str, port: int | None, uds: Path | None, max_connections: int
) -> list[socketserver.BaseServer]:
    handler = type("BoundHandler", (Handler,), {"state": state})
    # The listen backlog matches the connection cap (the stdlib default of 5 reset 47 of 100
    # simultaneous connections).
    bound = {"state": state, "request_queue_size": max(max_connections, 64)}
    servers: list[socketserver.BaseServer] = []
    if port is not None:
        tcp = type("BoundTCPServer", (TCPServer,), bound)((host, port), handler)
        tcp.slots = threading.BoundedSemaphore(max_connections)
        servers.append(tcp)
    if uds is not None:
        if uds.exists():
            uds.unlink()
        unix = type("BoundUnixServer", (UnixServer,), bound)(str(uds), handler)
        os.chmod(uds, 0o660)
        unix.slots = threading.BoundedSemaphore(max_connections)
        servers.append(unix)
    return servers
