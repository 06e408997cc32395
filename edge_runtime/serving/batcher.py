"""Dynamic batcher, in the spirit of Triton's.

Requests queue per model (bounded: a full queue rejects at once). A worker takes the oldest
request and keeps collecting until the batch reaches max_batch rows, reaches a preferred
size, or the oldest request has waited max_delay. Requests whose deadline passed while they
queued are failed with a timeout and never computed. A model that cannot be batched
(fixed batch 1, stateful, scalar inputs) runs one request at a time, in order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
RunBatch = Callable[[Feeds], dict[str, np.ndarray]]


class QueueFullError(RuntimeError):
    """The model's queue is full; the request was rejected without being queued."""


class RequestTimeoutError(TimeoutError):
    """The request outlived its timeout in the queue and was dropped, not computed."""


class BatcherClosedError(RuntimeError):
    pass


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 8
    # 0, as in Triton: batches form by themselves while the model is busy; a positive delay
    # trades latency at low load for larger batches.
    max_delay_ms: float = 0.0
    preferred: tuple[int, ...] = ()
    max_queue: int = 256
    timeout_ms: float = 10_000.0
    batchable: bool = True


@dataclass
class _Request:
    feeds: Feeds
    rows: int
    future: Future[dict[str, np.ndarray]]
    enqueued: float
    deadline: float
    started: float = 0.0
    batch: int = 0


@dataclass
class BatchObserver:
    """Hooks the runtime uses to count what the batcher does (kept free of any metrics type)."""

    on_batch: Callable[[int, float], None] = lambda rows, compute_s: None
    on_done: Callable[[float, float], None] = lambda queue_s, total_s: None
    on_expired: Callable[[], None] = lambda: None
    on_progress: Callable[[], None] = lambda: None


@dataclass
class Batcher:
    """Triton-style dynamic batching for one model: requests queue, a worker thread forms a batch up
    to the max size (or the preferred sizes), runs it, and splits the results.

    Owns the queue, its bound and the request deadlines (expired requests are dropped, never
    computed). Never validates inputs (the Runtime does) and never chooses a model version."""

    run: RunBatch
    settings: BatchSettings
    observer: BatchObserver = field(default_factory=BatchObserver)
    name: str = "model"

    def __post_init__(self) -> None:
        s = self.settings
        if s.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {s.max_batch}")
        if s.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {s.max_delay_ms}")
        if s.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {s.max_queue}")
        bad = [p for p in s.preferred if not 1 <= p <= s.max_batch]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} must lie in 1..max_batch ({s.max_batch})")
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy > 0

    def submit(self, feeds: Feeds, rows: int, timeout_ms: float | None = None) -> Future[dict[str, np.ndarray]]:
        now = time.monotonic()
        fut: Future[dict[str, np.ndarray]] = Future()
        timeout = self.settings.timeout_ms if timeout_ms is None else timeout_ms
        req = _Request(feeds, rows, fut, now, now + timeout / 1000.0)
        with self._cond:
            if self._closed:
                raise BatcherClosedError(f"model {self.name!r} is shutting down")
            if len(self._queue) >= self.settings.max_queue:
                raise QueueFullError(
                    f"model {self.name!r} queue is full ({self.settings.max_queue} requests); retry later"
                )
            self._queue.append(req)
            self._cond.notify()
        return fut

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; with drain, finish what is queued, else fail it."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._queue:
                    self._queue.popleft().future.set_exception(BatcherClosedError("shutting down"))
            self._cond.notify_all()
        self._thread.join(timeout)

    def _collect(self) -> list[_Request] | None:
        s = self.settings
        limit = s.max_batch if s.batchable else 1
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait(0.5)
                self.observer.on_progress()  # idle is healthy: the loop is alive
            batch: list[_Request] = []
            rows = 0
            first_enqueued = self._queue[0].enqueued
            while True:
                while self._queue and rows < limit:
                    nxt = self._queue[0]
                    if batch and rows + nxt.rows > limit:
                        break
                    self._queue.popleft()
                    batch.append(nxt)
                    rows += nxt.rows
                if rows >= limit or not s.batchable or rows in s.preferred or self._closed:
                    break
                if self._queue and rows + self._queue[0].rows > limit:
                    break
                remaining = first_enqueued + s.max_delay_ms / 1000.0 - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._busy += 1
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._busy -= 1
                self.observer.on_progress()

    def _execute(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        live = []
        for r in batch:
            if r.deadline < now:
                r.future.set_exception(
                    RequestTimeoutError(f"request waited {(now - r.enqueued) * 1000:.0f} ms, over its timeout")
                )
                self.observer.on_expired()
            elif r.future.set_running_or_notify_cancel():
                live.append(r)
        if not live:
            return
        names = list(live[0].feeds)
        feeds = (
            live[0].feeds if len(live) == 1 else {n: np.concatenate([r.feeds[n] for r in live], axis=0) for n in names}
        )
        rows = sum(r.rows for r in live)
        t0 = time.monotonic()
        try:
            outputs = self.run(feeds)
        except Exception as e:  # a failing model fails the batch, never the worker
            log.warning("model %s failed a batch of %d: %s", self.name, rows, e)
            for r in live:
                r.future.set_exception(e)
            return
        t1 = time.monotonic()
        self.observer.on_batch(rows, t1 - t0)
        offset = 0
        for r in live:
            if len(live) == 1:
                result = outputs
            else:
                result = {k: v[offset : offset + r.rows] for k, v in outputs.items()}
            offset += r.rows
            r.future.set_result(result)
            self.observer.on_done(t0 - r.enqueued, t1 - r.enqueued)
