"""Where results of sensor frames go: Python callbacks, streaming subscribers (SSE) and a
ring of recent results for telemetry. A slow subscriber loses its own oldest events (counted);
it never slows inference or other subscribers."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Result = dict[str, Any]


def summarize(outputs: dict[str, np.ndarray], labels: list[str] | None, top: int = 3) -> dict[str, Any]:
    """A small JSON view of one sample's outputs: top classes for classifiers, statistics else."""
    summary: dict[str, Any] = {}
    for name, arr in outputs.items():
        a = np.asarray(arr)[0] if np.asarray(arr).ndim else np.asarray(arr)
        if a.ndim == 1 and 1 < a.size <= 1000:
            order = np.argsort(a)[::-1][:top]
            summary[name] = [
                {"index": int(i), "label": labels[i] if labels and i < len(labels) else str(i), "score": float(a[i])}
                for i in order
            ]
        else:
            summary[name] = {"shape": list(a.shape), "mean": float(a.mean()), "max": float(a.max())}
    return summary


class Subscription:
    """One subscriber's bounded queue. ``notify`` (optional) is called after each event is queued,
    from the publishing thread: an event loop uses it to schedule its own read of the queue."""

    def __init__(self, hub: ResultHub, maxsize: int, notify: Callable[[], None] | None = None) -> None:
        self.queue: queue.Queue[Result] = queue.Queue(maxsize)
        self.dropped = 0
        self._hub = hub
        self._notify = notify

    def put(self, result: Result) -> None:
        while True:
            try:
                self.queue.put_nowait(result)
                if self._notify is not None:
                    self._notify()
                return
            except queue.Full:
                try:
                    self.queue.get_nowait()  # drop this subscriber's oldest event
                    self.dropped += 1
                except queue.Empty:
                    pass

    def poll(self) -> Result | None:
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None

    def get(self, timeout: float) -> Result | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        self._hub.unsubscribe(self)


class ResultHub:
    def __init__(self, keep: int = 256) -> None:
        self._callbacks: list[Callable[[Result], None]] = []
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self.recent: deque[Result] = deque(maxlen=keep)

    def on_result(self, callback: Callable[[Result], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def subscribe(self, maxsize: int = 64, notify: Callable[[], None] | None = None) -> Subscription:
        sub = Subscription(self, maxsize, notify)
        with self._lock:
            self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def publish(self, result: Result) -> None:
        self.recent.append(result)
        with self._lock:
            callbacks, subs = list(self._callbacks), list(self._subs)
        for cb in callbacks:
            try:
                cb(result)
            except Exception:  # a failing callback must not stop the frame loop
                log.exception("result callback failed")
        for sub in subs:
            sub.put(result)
