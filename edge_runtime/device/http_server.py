"""The daemon's HTTP server: one asyncio event loop, on its own thread, for every connection
of every listener (loopback TCP and/or a unix socket).

Why one loop and not a thread per connection: at 32 concurrent clients the model sat idle 16% of
the time while its thread waited for the interpreter lock behind 32 handler threads, and each
request paid two thread wake-ups. On one loop, a request costs parsing (httptools, in C), a
decode, a queue append and one loop wake-up per batch. Nothing on the loop blocks: models run on
their batchers' threads, raw frames are preprocessed on a small pool.

Limits (``Limits``): a connection cap (at the cap, the longest-idle keep-alive connection with
nothing unread is closed to make room, else the new client is answered 503 at once; accept never
blocks), a listen backlog above the cap so a burst of clients is answered rather than reset,
header, body and idle deadlines (see http_protocol), and per-connection pipelining depth. Every
refusal is counted in ``edgert_http_refused_total{reason}``; open connections are the gauge
``edgert_http_connections``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.device.http_api import Api
from edge_runtime.device.http_protocol import HttpConnection
from edge_runtime.device.status_page import StatusPage
from edge_runtime.serving.results import ResultHub
from edge_runtime.serving.runtime import Runtime

log = logging.getLogger(__name__)

SWEEP_S = 0.25
MIN_IDLE_TO_EVICT_S = 0.05  # a connection accepted a moment ago may have its request in flight
QUIET_MAX_CONNECTIONS = 16  # beyond this many open connections the server never runs a model on its loop


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 << 20
    max_json_bytes: int = 8 << 20
    max_header_bytes: int = 64 << 10
    idle_timeout_s: float = 15.0
    request_timeout_s: float = 30.0
    max_connections: int = 128
    max_pipeline: int = 16  # requests of one connection answered or in flight before its reading pauses

    @property
    def backlog(self) -> int:
        # Above the cap: clients of a burst wait in the kernel's queue and are answered (perhaps 503)
        # instead of reset; the stdlib default of 5 reset 47 of 100 simultaneous connections.
        return max(512, 2 * self.max_connections)


class ServerState:
    """What the API answers from: the runtime, the result hub, readiness, limits and refusal counts."""

    def __init__(
        self,
        runtime: Runtime,
        max_body_bytes: int = 64 << 20,
        hub: ResultHub | None = None,
        max_json_bytes: int = 8 << 20,
        idle_timeout_s: float = 15.0,
        request_timeout_s: float = 30.0,
        max_connections: int = 128,
        source_names: set[str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.hub = hub or ResultHub()
        self.limits = Limits(
            max_body_bytes=max_body_bytes, max_json_bytes=min(max_json_bytes, max_body_bytes),
            idle_timeout_s=idle_timeout_s, request_timeout_s=request_timeout_s, max_connections=max_connections,
        )  # fmt: skip
        self.source_names = source_names
        # Why each frame source gives no frames right now (name -> reason; "" while it does): set by
        # the daemon, read by /v2/stream so a client learns why nothing comes.
        self.source_errors: Callable[[], dict[str, str]] = dict
        self.status: StatusPage | None = None  # the device status page, when configured on
        self.ready = threading.Event()
        self.stopping = threading.Event()
        registry = runtime.metrics.registry
        self.refused = registry.counter(
            "edgert_http_refused_total", "HTTP requests and connections refused or cut, by reason", ("reason",)
        )
        self.connections = registry.gauge("edgert_http_connections", "Open HTTP connections")

    def count(self, reason: str) -> None:
        self.refused.inc(reason=reason)


class HttpServer:
    """All listeners of the daemon on one event loop. Binds in the constructor (so a port in use is
    an error at once, naming the address), serves from ``start()``, drains in ``stop()``."""

    def __init__(self, state: ServerState, host: str, port: int | None, uds: Path | None) -> None:
        self.state = state
        self.limits = state.limits
        self.loop = asyncio.new_event_loop()
        self.api = Api(state, self.loop)
        self.connections: set[HttpConnection] = set()
        self._servers: list[asyncio.Server] = []
        self._thread: threading.Thread | None = None
        self.port = 0
        self.uds = uds
        state.runtime.metrics.registry.on_collect(lambda: state.connections.set(len(self.connections)))
        try:
            if port is not None:
                self._listen_tcp(host, port)
            if uds is not None:
                self._listen_unix(uds)
        except BaseException:
            self._close_loop()
            raise

    def _listen_tcp(self, host: str, port: int) -> None:
        try:
            server = self.loop.run_until_complete(
                self.loop.create_server(
                    lambda: HttpConnection(self), host, port, backlog=self.limits.backlog, reuse_address=True
                )
            )
        except OSError as e:
            raise OSError(f"cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}") from None
        self._servers.append(server)
        self.port = int(server.sockets[0].getsockname()[1])

    def _listen_unix(self, path: Path) -> None:
        if path.exists() or path.is_symlink():
            path.unlink()
        try:
            server = self.loop.run_until_complete(
                self.loop.create_unix_server(lambda: HttpConnection(self), str(path), backlog=self.limits.backlog)
            )
        except OSError as e:
            raise OSError(f"cannot listen on unix socket {path}: {os.strerror(e.errno) if e.errno else e}") from None
        os.chmod(path, 0o660)
        self._servers.append(server)

    # --- connections (on the loop) ------------------------------------------------------

    def admit(self, conn: HttpConnection) -> bool:
        """Room for one more connection? At the cap, the longest-idle one makes room if any can."""
        if len(self.connections) >= self.limits.max_connections and not self._evict_idle():
            return False
        self.connections.add(conn)
        return True

    def _evict_idle(self) -> bool:
        now = time.monotonic()
        idle = [
            c for c in self.connections
            if c.kind == "idle" and not c.slots and now - c.idle_since >= MIN_IDLE_TO_EVICT_S
        ]  # fmt: skip
        for conn in sorted(idle, key=lambda c: c.idle_since):
            if conn.readable_now():  # its request is already here: not idle, just not read yet
                continue
            self.connections.discard(conn)
            conn.abort()
            self.count("evicted_idle")
            return True
        return False

    def quiet_except(self, conn: HttpConnection) -> bool:
        """Whether no other connection has a request waiting (parsed or still unread in its socket):
        the condition for running an inference at once on the loop. A server with many open
        connections is taken as busy without looking (the look costs one select over them)."""
        others = [c for c in self.connections if c is not conn]
        if len(others) > QUIET_MAX_CONNECTIONS:
            return False
        if any(c.slots or c.req is not None for c in others):
            return False
        fds = []
        for c in others:
            sock = c.transport.get_extra_info("socket") if c.transport is not None else None
            if sock is not None:
                fds.append(sock.fileno())
        if not fds:
            return True
        try:
            return not select.select(fds, [], [], 0)[0]
        except (OSError, ValueError):
            return False

    def forget(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)

    def count(self, reason: str) -> None:
        self.state.count(reason)

    def _sweep(self) -> None:
        """Expire connections past their deadline (idle, incomplete request, not reading)."""
        try:
            now = time.monotonic()
            for conn in [c for c in self.connections if c.deadline and c.deadline <= now]:
                conn.expire(conn.kind)
        except Exception:  # the sweep must keep running whatever one connection did
            log.exception("connection sweep failed")
        finally:
            self.loop.call_later(SWEEP_S, self._sweep)

    # --- running ------------------------------------------------------------------------

    def start(self) -> None:
        self.loop.call_soon(self._sweep)
        self._thread = threading.Thread(target=self._run, name="http-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def stop_accepting(self) -> None:
        """Close the listeners; connections already open go on (their requests finish)."""

        def close() -> None:
            for s in self._servers:
                s.close()

        self._call(close)
        if self.uds is not None and self.uds.exists():
            with contextlib.suppress(OSError):
                self.uds.unlink()

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let answers in flight be written (at most ``grace_s``), close the rest."""
        self.stop_accepting()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._call(lambda: any(c.slots for c in self.connections)):
            time.sleep(0.02)

        def close_all() -> None:
            for conn in list(self.connections):
                conn.abort()  # idle ones, and any whose answer outlived the grace period
            self.api.close()

        self._call(close_all)
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self._close_loop()

    def _call(self, fn: object) -> object:
        """Run ``fn`` on the loop and wait for its result (from another thread)."""
        assert callable(fn)
        if self._thread is None or not self._thread.is_alive():
            return fn()
        done = threading.Event()
        box: list[object] = [None]

        def run() -> None:
            try:
                box[0] = fn()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(5)
        return box[0]

    def _close_loop(self) -> None:
        if not self.loop.is_closed() and not self.loop.is_running():
            for s in self._servers:
                s.close()
            self.loop.close()
