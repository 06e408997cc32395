"""Dynamic batcher, in the spirit of Triton's, with the model's threads doing nothing else.

Batches form where requests arrive: ``submit`` appends a request to the forming batch at the
tail of the queue, copying its rows straight into that batch's buffer (allocated when a second
request joins), so the model's thread finds each batch already contiguous and never
concatenates. A request whose row shape differs, or that would overflow ``max_batch``, seals the
tail and starts the next forming batch (requests of different image sizes never fail a batch).
The queue is bounded: a full queue rejects at once.

N instances (Triton's instance group) are N worker threads, each owning one instance of the
model (``run(feeds, instance)``). A worker takes the head batch once it is ready (full, a
preferred size, sealed, or its oldest request waited ``max_delay``), runs it, and hands the
results back in one step per batch: all rows for one ``Sink`` (an event loop) go in one call,
so the HTTP loop is woken once per batch, not once per request. Then it takes the next batch:
statistics, metrics and histograms are done by the batcher's post thread from a ``BatchReport``
(drained every 20 ms: no extra thread wake-up per batch), never on the model's thread. Requests
whose deadline passed while they queued are failed with a timeout and never computed. A model
that cannot be batched runs one request at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
# (feeds, instance index) -> (outputs, tag); the tag (the model version that ran) is passed through
# to the batch's report untouched.
RunBatch = Callable[[Feeds, int], tuple[Outputs, Any]]
POST_PERIOD_S = 0.02  # statistics lag the answers by at most this much


class QueueFullError(RuntimeError):
    """The model's queue is full; the request was rejected without being queued."""


class RequestTimeoutError(TimeoutError):
    """The request outlived its timeout in the queue and was dropped, not computed."""


class BatcherClosedError(RuntimeError):
    pass


class Sink(Protocol):
    """Where results go back in bulk (an event loop): one call per batch, never blocking.
    Each item is (token, outputs or None, error or None)."""

    def deliver(self, items: list[tuple[Any, Outputs | None, BaseException | None]]) -> None: ...


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
    instances: int = 1
    # A request finding the model idle runs at once on the caller's thread when a one-row run takes
    # at most this long (0: never); see Batcher.try_inline.
    inline_max_ms: float = 0.0


@dataclass(slots=True)
class _Request:
    feeds: Feeds
    rows: int
    enqueued: float
    deadline: float
    future: Future[Outputs] | None = None
    sink: Sink | None = None
    token: Any = None


@dataclass(slots=True)
class _Forming:
    """A batch being formed: its requests and, once a second one joined, its contiguous buffers."""

    key: tuple[Any, ...]
    first_enqueued: float
    requests: list[_Request] = field(default_factory=list)
    rows: int = 0
    buffers: dict[str, np.ndarray] | None = None
    sealed: bool = False


@dataclass(slots=True)
class BatchReport:
    """What one executed batch did, for statistics (handed to the post thread)."""

    rows: int
    instance: int
    started: float  # time.monotonic() when the run began
    compute_s: float
    enqueued: list[float]
    feeds: Feeds
    outputs: Outputs | None
    error: BaseException | None
    tag: Any


@dataclass
class BatchObserver:
    """Hooks the runtime uses to count what the batcher does (kept free of any metrics type).
    ``after_batch`` runs on the batcher's post thread; the others are cheap and run in place."""

    after_batch: Callable[[BatchReport], None] | None = None
    on_expired: Callable[[], None] = lambda: None
    on_progress: Callable[[], None] = lambda: None


def _row_key(feeds: Feeds) -> tuple[Any, ...]:
    return tuple((n, a.dtype.str, a.shape[1:]) for n, a in feeds.items())


@dataclass
class Batcher:
    """Triton-style dynamic batching for one model: requests queue into forming batches, N worker
    threads (one per model instance) run ready batches and hand results back per batch.

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
        if s.instances < 1:
            raise ValueError(f"instances must be >= 1, got {s.instances}")
        bad = [p for p in s.preferred if not 1 <= p <= s.max_batch]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} must lie in 1..max_batch ({s.max_batch})")
        self._limit = s.max_batch if s.batchable else 1
        self._batches: deque[_Forming] = deque()
        self._queued = 0  # requests in forming batches
        self._cond = threading.Condition()
        self._closed = False
        self._busy = 0
        # Compute time of a one-row batch (a moving average): whether running one at once on the
        # caller's thread (``try_inline``) would hold that thread too long. None until known.
        self.single_s: float | None = None
        # Reports wait in a deque that the post thread drains every POST_PERIOD_S: no wake-up per batch,
        # and no thread taking the interpreter lock while the loop writes the answers of a batch.
        self._post: deque[BatchReport] = deque()
        self._post_stop = threading.Event()
        self._post_thread = threading.Thread(target=self._post_loop, name=f"post-{self.name}", daemon=True)
        self._post_thread.start()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"batcher-{self.name}-{i}", daemon=True)
            for i in range(s.instances)
        ]
        for t in self._threads:
            t.start()

    @property
    def depth(self) -> int:
        return self._queued

    @property
    def busy(self) -> bool:
        return self._busy > 0

    # --- submitting (any thread) --------------------------------------------------------

    def submit(self, feeds: Feeds, rows: int, timeout_ms: float | None = None) -> Future[Outputs]:
        """Queue a request; its outputs arrive on the returned future."""
        fut: Future[Outputs] = Future()
        self._enqueue(feeds, rows, timeout_ms, fut, None, None)
        return fut

    def submit_to(self, sink: Sink, token: Any, feeds: Feeds, rows: int, timeout_ms: float | None = None) -> None:
        """Queue a request whose outputs go to ``sink`` with ``token``, together with the rest of its batch."""
        self._enqueue(feeds, rows, timeout_ms, None, sink, token)

    def _enqueue(
        self, feeds: Feeds, rows: int, timeout_ms: float | None, fut: Future[Outputs] | None, sink: Sink | None,
        token: Any,
    ) -> None:  # fmt: skip
        now = time.monotonic()
        timeout = self.settings.timeout_ms if timeout_ms is None else timeout_ms
        req = _Request(feeds, rows, now, now + timeout / 1000.0, fut, sink, token)
        key = _row_key(feeds)
        with self._cond:
            if self._closed:
                raise BatcherClosedError(f"model {self.name!r} is shutting down")
            if self._queued >= self.settings.max_queue:
                raise QueueFullError(
                    f"model {self.name!r} queue is full ({self.settings.max_queue} requests); retry later"
                )
            tail = self._batches[-1] if self._batches else None
            if tail is not None and not tail.sealed and tail.key == key and tail.rows + rows <= self._limit:
                self._join(tail, req)
            else:
                if tail is not None:
                    tail.sealed = True
                self._batches.append(_Forming(key, now, [req], rows))
            self._queued += 1
            self._cond.notify()

    def _join(self, batch: _Forming, req: _Request) -> None:
        """Copy the request's rows into the batch's buffers (made when the second request joins)."""
        if batch.buffers is None:
            first = batch.requests[0]
            batch.buffers = {n: np.empty((self._limit, *a.shape[1:]), a.dtype) for n, a in first.feeds.items()}
            for n, a in first.feeds.items():
                batch.buffers[n][: first.rows] = a
        for n, a in req.feeds.items():
            batch.buffers[n][batch.rows : batch.rows + req.rows] = a
        batch.requests.append(req)
        batch.rows += req.rows

    def try_inline(self, feeds: Feeds, rows: int, max_s: float) -> tuple[Outputs, Any] | None:
        """Run one request at once on the caller's thread when the model is idle (nothing queued, no
        batch running) and a one-row run is known to take at most ``max_s``: no hand-off to the
        model's thread and back. None when it is not run (then submit it)."""
        single = self.single_s
        if single is None or single * rows > max_s:
            return None
        with self._cond:
            if self._closed or self._batches or self._busy:
                return None
            self._busy += 1
        now = time.monotonic()
        try:
            try:
                outputs, tag = self.run(feeds, 0)
            except Exception as e:
                self._report(BatchReport(rows, 0, now, time.monotonic() - now, [now], feeds, None, e, None))
                raise
            compute_s = time.monotonic() - now
            self._learn(rows, compute_s)
            self._report(BatchReport(rows, 0, now, compute_s, [now], feeds, outputs, None, tag))
            return outputs, tag
        finally:
            with self._cond:
                self._busy -= 1
                if self._batches:
                    self._cond.notify()
            self.observer.on_progress()

    def _learn(self, rows: int, compute_s: float) -> None:
        if rows == 1:  # down at once (the warm-up's first run is slow), up slowly (one slow run is noise)
            old = self.single_s
            self.single_s = compute_s if old is None or compute_s < old else 0.8 * old + 0.2 * compute_s

    def close(self, drain: bool = True, timeout: float = 30.0) -> None:
        """Stop accepting; with drain, finish what is queued, else fail it."""
        with self._cond:
            self._closed = True
            if not drain:
                while self._batches:
                    for r in self._batches.popleft().requests:
                        _fail(r, BatcherClosedError("shutting down"))
                self._queued = 0
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout)
        self._post_stop.set()
        self._post_thread.join(timeout)

    # --- the model's threads ------------------------------------------------------------

    def _ready(self, batch: _Forming) -> float:
        """0 when the head batch should run now, else the seconds left to wait for it to fill."""
        s = self.settings
        if batch.sealed or batch.rows >= self._limit or batch.rows in s.preferred or self._closed:
            return 0.0
        return max(0.0, batch.first_enqueued + s.max_delay_ms / 1000.0 - time.monotonic())

    def _collect(self) -> _Forming | None:
        with self._cond:
            while True:
                if not self._batches:
                    if self._closed:
                        return None
                    self._cond.wait(0.5)
                    self.observer.on_progress()  # idle is healthy: the loop is alive
                    continue
                wait = self._ready(self._batches[0])
                if wait <= 0:
                    batch = self._batches.popleft()
                    batch.sealed = True
                    self._queued -= len(batch.requests)
                    self._busy += 1
                    if self._batches:
                        self._cond.notify()  # another instance may take the next one
                    return batch
                self._cond.wait(wait)

    def _loop(self, instance: int) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                self._execute(batch, instance)
            except Exception:  # never lose the worker (a bug in delivery, a sink that raised)
                log.exception("batcher %s: a batch could not be completed", self.name)
            finally:
                with self._cond:
                    self._busy -= 1
                self.observer.on_progress()

    def _execute(self, batch: _Forming, instance: int) -> None:
        now = time.monotonic()
        live: list[_Request] = []
        for r in batch.requests:
            if r.deadline < now:
                _fail(r, RequestTimeoutError(f"request waited {(now - r.enqueued) * 1000:.0f} ms, over its timeout"))
                self.observer.on_expired()
            elif r.future is None or r.future.set_running_or_notify_cancel():
                live.append(r)
        if not live:
            return
        rows = sum(r.rows for r in live)
        if len(live) == 1:
            feeds = live[0].feeds
        elif batch.buffers is not None and len(live) == len(batch.requests):
            feeds = {n: b[:rows] for n, b in batch.buffers.items()}  # contiguous views, no copy
        else:  # some rows expired: compute only the live ones
            feeds = {n: np.concatenate([r.feeds[n] for r in live], axis=0) for n in live[0].feeds}
        t0 = time.monotonic()
        try:
            outputs, tag = self.run(feeds, instance)
        except Exception as e:  # a failing model fails the batch, never the worker
            log.warning("model %s failed a batch of %d: %s", self.name, rows, e)
            self._deliver(live, None, e)
            self._report(BatchReport(rows, instance, t0, time.monotonic() - t0, [r.enqueued for r in live], feeds,
                                     None, e, None))  # fmt: skip
            return
        compute_s = time.monotonic() - t0
        self._deliver(live, outputs, None)
        self._learn(rows, compute_s)
        self._report(BatchReport(rows, instance, t0, compute_s, [r.enqueued for r in live], feeds, outputs, None, tag))

    def _deliver(self, live: list[_Request], outputs: Outputs | None, error: BaseException | None) -> None:
        by_sink: dict[int, tuple[Sink, list[tuple[Any, Outputs | None, BaseException | None]]]] = {}
        offset = 0
        single = len(live) == 1
        for r in live:
            if outputs is None:
                result = None
            elif single:
                result = outputs
            else:
                result = {k: v[offset : offset + r.rows] for k, v in outputs.items()}
            offset += r.rows
            if r.sink is not None:
                by_sink.setdefault(id(r.sink), (r.sink, []))[1].append((r.token, result, error))
            elif r.future is not None:
                if error is not None:
                    r.future.set_exception(error)
                else:
                    assert result is not None
                    r.future.set_result(result)
        for sink, items in by_sink.values():
            sink.deliver(items)  # one hand-off per batch and sink

    def _report(self, report: BatchReport) -> None:
        if self.observer.after_batch is not None:
            self._post.append(report)  # deque.append is atomic; the post thread drains it

    def _post_loop(self) -> None:
        while True:
            stopping = self._post_stop.wait(POST_PERIOD_S)
            self.drain_reports()
            if stopping:
                return

    def drain_reports(self) -> None:
        """Count every batch reported so far, now (the post thread does this every 20 ms; a metrics
        scrape does it first, so what it shows is never behind the answers already given)."""
        hook = self.observer.after_batch
        while True:
            try:
                report = self._post.popleft()
            except IndexError:
                return
            if hook is None:
                continue
            try:
                hook(report)
            except Exception:  # statistics must never take serving down
                log.exception("batcher %s: statistics of a batch failed", self.name)


def _fail(r: _Request, error: BaseException) -> None:
    if r.sink is not None:
        r.sink.deliver([(r.token, None, error)])
    elif r.future is not None and not r.future.done():
        r.future.set_exception(error)
