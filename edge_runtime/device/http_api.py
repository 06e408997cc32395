"""The daemon's HTTP API on the event loop: Open Inference Protocol v2 (health, server and model
metadata, infer with the binary tensor extension), /metrics in the Prometheus text format, and
the /v2/stream Server-Sent Events of frame results.

Errors are JSON ``{"error": "..."}`` with the status the protocol's clients expect: 400 bad
input, 404 unknown model or endpoint, 405 wrong method, 413 too large, 429 queue full, 503 not
ready or shutting down, 504 timed out in the queue, 500 the model itself failed.

An inference is decoded on the loop (the body is already one bytes object; binary tensors are views of
it), validated and queued by the Runtime, whose batcher copies its rows into the forming batch;
the whole batch's outputs come back to the loop in one hand-off (``LoopSink``) and are encoded
here. Raw uint8 frames are preprocessed on a small thread pool so the loop never waits on OpenCV.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import numpy as np

from edge_runtime import __version__
from edge_runtime.contracts.oip import NUMPY_TO_OIP, ProtocolError, decode_request, encode_response
from edge_runtime.device.http_protocol import HttpConnection, Request, Slot, error_body, response
from edge_runtime.device.status_page import HEADERS as STATUS_HEADERS
from edge_runtime.device.status_page import HTML as STATUS_HTML
from edge_runtime.device.status_page import JS as STATUS_JS
from edge_runtime.serving.batcher import BatcherClosedError, QueueFullError, RequestTimeoutError
from edge_runtime.serving.frames import raw_frame_input
from edge_runtime.serving.runtime import ModelNotFoundError, Runtime
from edge_runtime.serving.tensors import InputError

if TYPE_CHECKING:
    from edge_runtime.device.http_server import ServerState

log = logging.getLogger(__name__)

REFUSAL_REASONS = {400: "bad_request", 404: "not_found", 405: "bad_method", 411: "length_required",
                   413: "too_large", 429: "queue_full", 503: "not_ready", 504: "timeout"}  # fmt: skip
OCTET = b"application/octet-stream"
TEXT = b"text/plain; version=0.0.4; charset=utf-8"


def error_status(e: BaseException) -> int:
    """The HTTP status of an inference error (the same mapping for HTTP and gRPC)."""
    if isinstance(e, ModelNotFoundError):
        return 404
    if isinstance(e, (ProtocolError, InputError, ValueError)):
        return 400
    if isinstance(e, QueueFullError):
        return 429
    if isinstance(e, (RequestTimeoutError, TimeoutError)):
        return 504
    if isinstance(e, BatcherClosedError):
        return 503
    return 500


def error_message(name: str, e: BaseException) -> str:
    status = error_status(e)
    if status == 500:
        return f"model {name!r} failed: {type(e).__name__}: {e}"
    return str(e) or "request timed out"


def check_requested_outputs(runtime: Runtime, name: str, version: str | None, request: dict[str, Any]) -> None:
    """Requested outputs must be outputs of the model (the protocol's error, not a silent drop)."""
    wanted = request.get("outputs") or []
    if not isinstance(wanted, list):
        raise ProtocolError("'outputs' must be a list of {\"name\": ...} objects")
    names = [o.get("name") if isinstance(o, dict) else o for o in wanted]
    if not names:
        return
    known = runtime.get(name, version).current.output_names
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ProtocolError(f"requested outputs {unknown} are not outputs of model {name!r}; its outputs are {known}")


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

    raw = raw_frame_input(m)
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
            "instances": handle.settings.instances,
            "providers": handle.current.backend.active_providers,
            # Inputs that also take camera frames as they are: uint8 [H,W,C] or [N,H,W,C], BGR(A),
            # any size; the bundle's own preprocessing turns them into the model input.
            "raw_frames": (
                [
                    {
                        "input": raw.name,
                        "datatype": "UINT8",
                        "shape": [-1, -1, -1, 3],
                        "color": "bgr",
                        "preprocess": m.preprocess.model_dump(mode="json") if m.preprocess else None,
                    }
                ]
                if raw is not None
                else []
            ),
        },
    }


def _parse_model_path(path: str) -> tuple[str, str | None, str]:
    parts = path.split("/")[3:]  # after "", "v2", "models"
    name = parts[0] if parts else ""
    version = None
    rest = parts[1:]
    if len(rest) >= 2 and rest[0] == "versions":
        version, rest = rest[1], rest[2:]
    return name, version, "/".join(rest)


Item = tuple[Any, "dict[str, np.ndarray] | None", "BaseException | None"]


class Waiter:
    """A lone request whose answer the loop awaits for a moment (the model is idle and fast): the
    model's thread hands the answer over directly, and the loop needs no wake-up. If the wait runs
    out first, the answer goes the usual way (``call_soon_threadsafe``)."""

    __slots__ = ("event", "item", "lock", "state")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.state = "waiting"  # -> "done" (answer handed over) or "abandoned" (the loop went on)
        self.item: Item | None = None


@dataclass(slots=True)
class Pending:
    """One HTTP inference on its way through a batcher: where its answer goes and how to encode it."""

    conn: HttpConnection
    slot: Slot
    req: Request
    request: dict[str, Any]
    name: str
    waiter: Waiter | None = None


class LoopSink:
    """Where a batcher hands a whole batch back: one ``call_soon_threadsafe`` per batch, so the loop
    is woken once per batch rather than once per request (none for an awaited lone request)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, api: Api) -> None:
        self._loop = loop
        self._api = api

    def deliver(self, items: list[Item]) -> None:
        rest = []
        for item in items:
            pending: Pending = item[0][0]  # the Runtime hands back (token, version) as each token
            waiter = pending.waiter
            if waiter is not None:
                with waiter.lock:
                    if waiter.state == "waiting":
                        waiter.item, waiter.state = item, "done"
                        waiter.event.set()
                        continue
            rest.append(item)
        if rest:
            self._loop.call_soon_threadsafe(self._api.finish_batch, rest)


class Api:
    """Routes a complete request to its answer. Runs on the loop; never runs a model."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.runtime = state.runtime
        self.loop = loop
        self.sink = LoopSink(loop, self)
        self._frames_pool: ThreadPoolExecutor | None = None
        # Inferences queued and not yet answered: the loop awaits a lone request's answer only when
        # there are none (a busy server batches, and the loop keeps reading).
        self.inflight = 0

    def frames_pool(self) -> ThreadPoolExecutor:
        """Where raw frames are preprocessed (OpenCV releases the interpreter lock), off the loop; shared
        by HTTP and gRPC, made at the first raw frame."""
        if self._frames_pool is None:
            import os

            self._frames_pool = ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="frames")
        return self._frames_pool

    def close(self) -> None:
        if self._frames_pool is not None:
            self._frames_pool.shutdown(wait=False, cancel_futures=True)

    # --- answers ------------------------------------------------------------------------

    def _answer(self, conn: HttpConnection, slot: Slot, req: Request, status: int, body: bytes,
                ctype: bytes = b"application/json", extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:  # fmt: skip
        keep = req.keep_alive and not self.state.stopping.is_set()
        conn.complete(slot, response(status, body, ctype, keep_alive=keep, extra=extra, http10=req.version == "1.0"),
                      close=not keep)  # fmt: skip

    def _json(self, conn: HttpConnection, slot: Slot, req: Request, status: int, doc: dict[str, Any]) -> None:
        self._answer(conn, slot, req, status, json.dumps(doc).encode())

    def _error(self, conn: HttpConnection, slot: Slot, req: Request, status: int, message: str) -> None:
        self.state.count(REFUSAL_REASONS.get(status, str(status)))
        self._answer(conn, slot, req, status, error_body(message))

    # --- routing ------------------------------------------------------------------------

    def handle(self, conn: HttpConnection, slot: Slot, req: Request) -> None:
        try:
            if req.method in ("GET", "HEAD"):
                self._get(conn, slot, req)
            elif req.method == "POST":
                self._post(conn, slot, req)
            else:
                self._error(conn, slot, req, 405, f"method {req.method} is not allowed; expected GET, HEAD or POST")
        except Exception as e:  # a bug answering one request never takes the loop down
            log.exception("answering %s %s failed", req.method, req.path)
            self._error(conn, slot, req, 500, f"internal error: {type(e).__name__}")

    def _get(self, conn: HttpConnection, slot: Slot, req: Request) -> None:
        path = req.path.rstrip("/")
        rt, state = self.runtime, self.state
        if path == "/v2/health/live":
            self._json(conn, slot, req, 200, {"live": True})
        elif path == "/v2/health/ready":
            ok = state.ready.is_set() and not state.stopping.is_set()
            self._json(conn, slot, req, 200 if ok else 503, {"ready": ok})
        elif path == "/v2":
            self._json(conn, slot, req, 200, {"name": "edgert", "version": __version__,
                                              "extensions": ["binary_tensor_data"]})  # fmt: skip
        elif path == "/metrics":
            self._answer(conn, slot, req, 200, rt.metrics.registry.render().encode(), TEXT)
        elif path == "/v2/stream":
            self._stream(conn, slot, req)
        elif path == "/status" or path.startswith("/status."):
            self._status(conn, slot, req, path)
        elif path.startswith("/status/frames/"):
            self._status_frame(conn, slot, req, path)
        elif path.startswith("/v2/models/"):
            name, version, rest = _parse_model_path(path)
            try:
                if rest == "ready":
                    rt.get(name, version)
                    self._json(conn, slot, req, 200, {"name": name, "ready": state.ready.is_set()})
                elif rest == "":
                    self._json(conn, slot, req, 200, model_metadata(rt, name, version))
                else:
                    self._error(conn, slot, req, 404, f"no such endpoint: {req.path}")
            except ModelNotFoundError as e:
                self._error(conn, slot, req, 404, str(e))
        else:
            self._error(conn, slot, req, 404, f"no such endpoint: {req.path}")

    def _status(self, conn: HttpConnection, slot: Slot, req: Request, path: str) -> None:
        page = self.state.status
        if page is None:
            return self._error(conn, slot, req, 404, "the status page is off (status_page: true in the configuration)")
        if path == "/status":
            self._answer(conn, slot, req, 200, STATUS_HTML, b"text/html; charset=utf-8", STATUS_HEADERS)
        elif path == "/status.js":
            self._answer(conn, slot, req, 200, STATUS_JS, b"text/javascript; charset=utf-8", STATUS_HEADERS)
        elif path == "/status.json":
            body = json.dumps(page.snapshot(), default=str).encode()
            self._answer(conn, slot, req, 200, body, b"application/json", STATUS_HEADERS)
        else:
            self._error(conn, slot, req, 404, f"no such endpoint: {req.path}")

    def _status_frame(self, conn: HttpConnection, slot: Slot, req: Request, path: str) -> None:
        page = self.state.status
        name = unquote(path[len("/status/frames/") :].removesuffix(".jpg"))
        jpeg = page.frame_jpeg(name) if page is not None else None
        if jpeg is None:
            return self._error(conn, slot, req, 404, f"no frame from source {name!r} (yet), or the status page is off")
        self._answer(conn, slot, req, 200, jpeg, b"image/jpeg", STATUS_HEADERS)

    def _post(self, conn: HttpConnection, slot: Slot, req: Request) -> None:
        path = req.path.rstrip("/")
        if not path.startswith("/v2/models/"):
            self._error(conn, slot, req, 404, f"no such endpoint: {req.path}")
            return
        name, version, rest = _parse_model_path(path)
        if rest != "infer":
            self._error(conn, slot, req, 404, f"no such endpoint: {req.path}")
            return
        if self.state.stopping.is_set() or not self.state.ready.is_set():
            self._error(conn, slot, req, 503, "server is not ready (starting or shutting down)")
            return
        try:
            header = req.headers.get("inference-header-content-length")
            if header is not None and not header.isdigit():
                raise ProtocolError(f"Inference-Header-Content-Length {header!r} is not a number")
            request, feeds = decode_request(req.body, int(header) if header is not None else None)
            check_requested_outputs(self.runtime, name, version, request)
            timeout = (request.get("parameters") or {}).get("timeout_ms")
            timeout_ms = float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None
            if self.runtime.wants_preprocessing(name, feeds, version):
                self._submit_frames(Pending(conn, slot, req, request, name), name, feeds, version, timeout_ms)
                return
            # Nothing else waiting and a fast model: await this answer here for a moment, saving the
            # loop's wake-up (its share of 0.4 ms of hand-offs a request on 2 cores). The model still
            # runs on its own thread: a request that hangs it holds the loop for the limit at most.
            handle = self.runtime.get(name, version)
            limit_s = handle.settings.inline_max_ms / 1000.0
            single = handle.batcher.single_s
            lone = (limit_s > 0 and single is not None and single <= limit_s and not self.inflight
                    and conn.server.quiet_except(conn))  # fmt: skip
            waiter = Waiter() if lone else None
            self.runtime.submit_to(
                self.sink, Pending(conn, slot, req, request, name, waiter), name, feeds, version, timeout_ms
            )
            self.inflight += 1
        except Exception as e:
            self._error(conn, slot, req, error_status(e), error_message(name, e))
            return
        if waiter is not None:
            got = waiter.event.wait(limit_s)
            with waiter.lock:
                if not got and waiter.state == "waiting":
                    waiter.state = "abandoned"  # the answer will come through the loop
                    return
            assert waiter.item is not None
            self.runtime.metrics.lone.inc(model=name)
            self.finish_batch([waiter.item])

    def _submit_frames(self, token: Pending, name: str, feeds: dict[str, np.ndarray], version: str | None,
                       timeout_ms: float | None) -> None:  # fmt: skip
        """Raw frames: preprocessing (OpenCV resize and normalisation) runs on a pool thread."""

        def work() -> None:  # on a pool thread: OpenCV's preprocessing, then the queue
            self.runtime.submit_to(self.sink, token, name, feeds, version, timeout_ms)

        self.inflight += 1
        fut = self.loop.run_in_executor(self.frames_pool(), work)

        def done(f: asyncio.Future[None]) -> None:
            error = f.exception()
            if error is not None:
                self.finish_batch([((token, ""), None, error)])

        fut.add_done_callback(done)

    def finish_batch(self, items: list[Item]) -> None:
        """On the loop: encode and write the answers of one batch (each token comes back with the
        version the Runtime routed it to)."""
        self.inflight = max(0, self.inflight - len(items))
        for (token, routed), outputs, error in items:
            conn, slot, req, request, name = token.conn, token.slot, token.req, token.request, token.name
            if conn.closed:
                continue
            try:
                if error is not None:
                    if error_status(error) == 500:
                        log.warning("inference on %s failed: %s", name, error)
                    self._error(conn, slot, req, error_status(error), error_message(name, error))
                    continue
                assert outputs is not None
                body, header_len = encode_response(name, routed, request, outputs)
            except Exception as e:
                log.exception("encoding the answer of %s failed", name)
                self._error(conn, slot, req, 500, f"model {name!r} answer could not be encoded: {e}")
                continue
            if header_len is None:
                self._answer(conn, slot, req, 200, body)
            else:
                self._answer(conn, slot, req, 200, body, OCTET,
                             ((b"Inference-Header-Content-Length", str(header_len).encode()),))  # fmt: skip

    # --- Server-Sent Events -------------------------------------------------------------

    def _stream(self, conn: HttpConnection, slot: Slot, req: Request) -> None:
        """One ``event: result`` per frame result, until the client goes; a slow client loses its
        own oldest events (counted by its subscription), never slowing anyone else."""
        wanted = req.query.get("source")
        known = self.state.source_names
        if wanted and known is not None and wanted not in known:
            self._error(conn, slot, req, 404,
                        f"no frame source {wanted!r}; sources: {sorted(known) or 'none configured'}")  # fmt: skip
            return

        def start() -> None:
            t = conn.transport
            if t is None or conn.closed:
                return
            conn.kind, conn.deadline = "stream", 0.0
            t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                    b"Connection: close\r\n\r\n: edgert results stream\n\n")  # fmt: skip

            def notify() -> None:
                self.loop.call_soon_threadsafe(pump)

            sub = self.state.hub.subscribe(notify=notify)
            conn.on_close(sub.close)

            def pump() -> None:
                while not conn.closed:
                    result = sub.poll()
                    if result is None:
                        return
                    if wanted and result.get("source") != wanted:
                        continue
                    t.write(b"event: result\ndata: " + json.dumps(result).encode() + b"\n\n")

            def report_errors() -> None:
                """A source that gives no frames says why, instead of a stream that stays silent."""
                for source, reason in sorted(self.state.source_errors().items()):
                    if reason and (not wanted or source == wanted):
                        doc = json.dumps({"source": source, "error": reason}).encode()
                        t.write(b"event: source-error\ndata: " + doc + b"\n\n")

            def keepalive() -> None:
                if conn.closed:
                    return
                if self.state.stopping.is_set():
                    conn.abort()
                    return
                t.write(b": keep-alive\n\n")  # proxies and clients see the stream is alive
                report_errors()
                self.loop.call_later(15.0, keepalive)

            report_errors()
            self.loop.call_later(15.0, keepalive)

        slot.stream = start
        conn.flush()
