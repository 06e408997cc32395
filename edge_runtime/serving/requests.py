"""The request path of the Runtime: admission (raw frames turned into inputs, inputs checked, the
batch limit), routing (the served version or an A/B variant) and queueing, by future or by sink,
and the Python API's ``infer``. It never loads, swaps or frees a version: the Runtime does that."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import numpy as np

from edge_runtime.serving.batcher import Batcher, BatchSettings, Sink
from edge_runtime.serving.cache import PredictionCache
from edge_runtime.serving.frames import frames_to_input, is_raw_frame, raw_frame_input
from edge_runtime.serving.handles import ModelHandle, ModelNotFoundError, RuntimeMetrics, Submission
from edge_runtime.serving.tensors import InputError, check_inputs


class RequestPath:
    """Requests to resident models; the Runtime holds the models (``_models``) and this serves them."""

    _models: dict[str, ModelHandle]
    metrics: RuntimeMetrics
    batching: BatchSettings

    def get(self, name: str, version: str | None = None) -> ModelHandle:
        handle = self._models.get(name)
        if handle is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded; loaded: {sorted(self._models) or 'none'}")
        if version is not None and version != handle.current.version:
            raise ModelNotFoundError(
                f"model {name!r} version {version!r} is not loaded; serving {handle.current.version}"
            )
        return handle

    def models(self) -> list[ModelHandle]:
        return list(self._models.values())

    def _admit(
        self, name: str, feeds: dict[str, np.ndarray], version: str | None
    ) -> tuple[ModelHandle, dict[str, np.ndarray], int]:
        """Count and validate a request (raw uint8 frames become model inputs first); -> (handle,
        feeds, rows). Runs on the caller's thread, never on the model's."""
        handle = self.get(name, version)
        self.metrics.requests.inc(model=name)
        try:
            spec = raw_frame_input(handle.manifest)
            if spec is not None and is_raw_frame(handle.manifest, feeds):
                feeds = {spec.name: frames_to_input(feeds[spec.name], handle.manifest)}
                self.metrics.raw_frames.inc(model=name)
            batch = check_inputs(handle.inputs, feeds)
            rows = batch or 1
            if handle.settings.batchable and rows > handle.settings.max_batch:
                raise InputError(f"batch of {rows} exceeds max batch {handle.settings.max_batch} of model {name!r}")
        except InputError:
            self.metrics.rejected.inc(model=name, reason="bad_input")
            raise
        return handle, feeds, rows

    def wants_preprocessing(self, name: str, feeds: dict[str, np.ndarray], version: str | None = None) -> bool:
        """Whether these feeds are raw frames that the bundle's preprocessing will turn into inputs
        (a server may do that work on a pool thread instead of its event loop)."""
        handle = self.get(name, version)
        return raw_frame_input(handle.manifest) is not None and is_raw_frame(handle.manifest, feeds)

    def _batcher_for(self, handle: ModelHandle) -> tuple[Batcher, str]:
        exp = handle.experiment
        if exp is not None and exp.batcher is not None and exp.route_to_variant():
            return exp.batcher, exp.version
        return handle.batcher, handle.current.version

    def submit(
        self,
        name: str,
        feeds: dict[str, np.ndarray],
        version: str | None = None,
        timeout_ms: float | None = None,
    ) -> Submission:
        """Validate and queue a request on the model's batcher; the submission names the version it
        was routed to (the A/B variant, or the served version) and holds the outputs' future."""
        handle, feeds, rows = self._admit(name, feeds, version)
        return self._submit_admitted(handle, feeds, rows, timeout_ms)

    def _submit_admitted(
        self, handle: ModelHandle, feeds: dict[str, np.ndarray], rows: int, timeout_ms: float | None
    ) -> Submission:
        name = handle.name
        key = None
        if handle.cache is not None and handle.experiment is None:  # experiments see every request
            key = PredictionCache.key(handle.current.version, feeds)
            hit = handle.cache.get(key)
            if hit is not None:
                self.metrics.cache_hits.inc(model=name)
                done: Future[dict[str, np.ndarray]] = Future()
                done.set_result(hit)
                return Submission(done, handle.current.version)
            self.metrics.cache_misses.inc(model=name)
        batcher, routed = self._batcher_for(handle)
        try:
            fut = batcher.submit(feeds, rows, timeout_ms)
        except Exception:
            self.metrics.rejected.inc(model=name, reason="queue_full")
            raise
        if key is not None and handle.cache is not None:
            cache = handle.cache
            fut.add_done_callback(lambda f: cache.put(key, f.result()) if f.exception() is None else None)
        return Submission(fut, routed)

    def submit_to(
        self,
        sink: Sink,
        token: Any,
        name: str,
        feeds: dict[str, np.ndarray],
        version: str | None = None,
        timeout_ms: float | None = None,
    ) -> str:
        """As ``submit``, but the outputs go to ``sink`` together with the rest of their batch (one
        hand-off per batch: what the HTTP event loop uses). The sink receives ``(token, version)``
        as each item's token, the version being the one the request was routed to, which is also
        returned. A model with a prediction cache goes through a future."""
        handle, feeds, rows = self._admit(name, feeds, version)
        if handle.cache is not None and handle.experiment is None:
            sub = self._submit_admitted(handle, feeds, rows, timeout_ms)

            def forward(f: Future[dict[str, np.ndarray]]) -> None:
                error = f.exception()
                sink.deliver([((token, sub.version), None if error else f.result(), error)])

            sub.future.add_done_callback(forward)
            return sub.version
        batcher, routed = self._batcher_for(handle)
        try:
            batcher.submit_to(sink, (token, routed), feeds, rows, timeout_ms)
        except Exception:
            self.metrics.rejected.inc(model=name, reason="queue_full")
            raise
        return routed

    def infer(
        self,
        name: str,
        feeds: dict[str, np.ndarray] | np.ndarray,
        version: str | None = None,
        timeout_ms: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run one request and wait for it: through the model's batcher, or, when the model is idle
        and a run is known to take at most its ``inline_max_ms``, at once on this thread (no hand-off
        to the model's thread and back; a hang hangs only this caller, as waiting would)."""
        if isinstance(feeds, np.ndarray):
            specs = self.get(name, version).inputs
            if len(specs) != 1:
                raise InputError(f"model {name!r} has {len(specs)} inputs; pass a dict keyed by input name")
            feeds = {specs[0].name: feeds}
        handle = self.get(name, version)
        limit = handle.settings.inline_max_ms
        if limit > 0 and handle.experiment is None and handle.cache is None:
            handle, admitted, rows = self._admit(name, feeds, version)
            done = handle.batcher.try_inline(admitted, rows, limit / 1000.0)
            if done is not None:
                self.metrics.lone.inc(model=name)
                return done[0]
            wait = (timeout_ms or self.batching.timeout_ms) / 1000.0 + 30.0
            return self._submit_admitted(handle, admitted, rows, timeout_ms).result(timeout=wait)
        wait = (timeout_ms or self.batching.timeout_ms) / 1000.0 + 30.0
        return self.submit(name, feeds, version, timeout_ms).result(timeout=wait)
