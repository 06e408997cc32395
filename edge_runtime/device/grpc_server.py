"""The Open Inference Protocol v2 over gRPC (KServe v2 / Triton's ``GRPCInferenceService``), on the
HTTP server's own event loop: ``tritonclient.grpc`` works unchanged.

Off by default (``grpc_port``); needs the ``grpc`` extra. The same runtime path as HTTP: decoded
on the loop, queued with the batch hand-off sink, raw frames preprocessed on a pool thread. The
same limits (message size = the binary body limit, idle connections closed after the HTTP idle
timeout, concurrent RPCs capped at the connection cap) and the same errors, as gRPC status codes:
400 INVALID_ARGUMENT, 404 NOT_FOUND, 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 504
DEADLINE_EXCEEDED, 500 INTERNAL; refusals are counted in ``edgert_grpc_refused_total{reason}``.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime import __version__
from edge_runtime.contracts.grpc_v2 import SERVICE, decode_infer_request, encode_infer_response, messages
from edge_runtime.device.http_api import REFUSAL_REASONS, check_requested_outputs, error_message, error_status
from edge_runtime.serving.runtime import ModelNotFoundError

if TYPE_CHECKING:
    from edge_runtime.device.http_server import HttpServer

log = logging.getLogger(__name__)


class _GrpcSink:
    """A batch's results back onto the loop in one hand-off; each token is an asyncio future."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def deliver(self, items: list[tuple[Any, dict[str, np.ndarray] | None, BaseException | None]]) -> None:
        self._loop.call_soon_threadsafe(self._finish, items)

    @staticmethod
    def _finish(items: list[tuple[Any, dict[str, np.ndarray] | None, BaseException | None]]) -> None:
        for (fut, version), outputs, error in items:
            if not fut.done():
                fut.set_result((version, outputs, error))


class GrpcServer:
    """Serves the v2 gRPC service on ``host:port`` from the HTTP server's loop."""

    def __init__(self, http: HttpServer, host: str, port: int) -> None:
        import grpc  # the grpc extra: a clear error at start when it is missing

        self._grpc = grpc
        self.http = http
        self.state = http.state
        self.runtime = http.state.runtime
        self.loop = http.loop
        self.host, self.requested_port = host, port
        self.port = 0
        self.sink = _GrpcSink(self.loop)
        self._server: Any = None
        self.refused = self.runtime.metrics.registry.counter(
            "edgert_grpc_refused_total", "gRPC requests refused, by reason", ("reason",)
        )
        self.m = messages()
        self._codes = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                       429: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE,
                       504: grpc.StatusCode.DEADLINE_EXCEEDED, 500: grpc.StatusCode.INTERNAL}  # fmt: skip

    def start(self) -> None:
        """Bind and start on the (running) loop; raises when the port cannot be had."""
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(15)

    async def _start(self) -> None:
        grpc = self._grpc
        limits = self.state.limits
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limits.max_body_bytes),
                ("grpc.max_send_message_length", limits.max_body_bytes),
                ("grpc.max_connection_idle_ms", int(limits.idle_timeout_s * 1000)),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=limits.max_connections * limits.max_pipeline,
        )
        handlers = {}
        for rpc in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"):
            handlers[rpc] = grpc.unary_unary_rpc_method_handler(
                getattr(self, rpc),
                request_deserializer=self.m[f"{rpc}Request"].FromString,
                response_serializer=self.m[f"{rpc}Response"].SerializeToString,
            )
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        address = f"{self.host}:{self.requested_port}"
        try:
            self.port = self._server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"cannot listen for gRPC on {address}: {e}") from None
        if not self.port:
            raise OSError(f"cannot listen for gRPC on {address} (address in use?)")
        await self._server.start()

    def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None and not self.loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self.loop)
            try:
                fut.result(grace_s + 5)
            except Exception as e:  # the process is going down anyway
                log.warning("gRPC server did not stop cleanly: %s", e)

    # --- RPCs ---------------------------------------------------------------------------

    async def _refuse(self, context: Any, status: int, message: str) -> None:
        self.refused.inc(reason=REFUSAL_REASONS.get(status, str(status)))
        await context.abort(self._codes.get(status, self._grpc.StatusCode.UNKNOWN), message)

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return self.m["ServerLiveResponse"](live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        ok = self.state.ready.is_set() and not self.state.stopping.is_set()
        return self.m["ServerReadyResponse"](ready=ok)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            self.runtime.get(request.name, request.version or None)
        except ModelNotFoundError as e:
            await self._refuse(context, 404, str(e))
        return self.m["ModelReadyResponse"](ready=self.state.ready.is_set())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return self.m["ServerMetadataResponse"](name="edgert", version=__version__, extensions=["binary_tensor_data"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        from edge_runtime.device.http_api import model_metadata

        try:
            meta = model_metadata(self.runtime, request.name, request.version or None)
        except ModelNotFoundError as e:
            await self._refuse(context, 404, str(e))
        resp = self.m["ModelMetadataResponse"](name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        name, version = request.model_name, request.model_version or None
        if self.state.stopping.is_set() or not self.state.ready.is_set():
            await self._refuse(context, 503, "server is not ready (starting or shutting down)")
        try:
            doc, feeds = decode_infer_request(request)
            check_requested_outputs(self.runtime, name, version, doc)
            timeout = (doc.get("parameters") or {}).get("timeout_ms")
            timeout_ms = float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None
            fut: asyncio.Future[tuple[str, dict[str, np.ndarray] | None, BaseException | None]] = (
                self.loop.create_future()
            )
            submit = partial(self.runtime.submit_to, self.sink, fut, name, feeds, version, timeout_ms)
            if self.runtime.wants_preprocessing(name, feeds, version):
                await self.loop.run_in_executor(self.http.api.frames_pool(), submit)
            else:
                submit()
            routed, outputs, error = await fut
            if error is not None:
                raise error
            assert outputs is not None
            return encode_infer_response(name, routed, doc, outputs)
        except Exception as e:
            if isinstance(e, self._grpc.aio.AbortError):
                raise
            await self._refuse(context, error_status(e), error_message(name, e))
