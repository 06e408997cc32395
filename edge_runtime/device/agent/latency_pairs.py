"""Paired latency: the new and the previous version timed on the same inputs, back to back, by
the same thread, while the health window runs.

Why: comparing the new version's latency in its window with the old version's figures from
before the update compares two different moments of a shared, noisy machine. An identical model
was rolled back for "p95 5.9x" because something else loaded the CPU during its window. Here
every sample is a pair measured within a millisecond of each other, in alternating order, so a
load that comes and goes hits both sides alike and cancels in the ratio. The verdict needs
statistical evidence too: the new version must be slower in significantly more pairs than not (a
one-sided sign test), its p95 over the pairs above the limit, and the increase above the
absolute floor.

The probe runs off the request path on a sample of served batches (at most one every
``interval_s``, dropped when it falls behind), using the old version kept warm as the standby
during the window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

from edge_runtime.serving.versions import ModelVersion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairedVerdict:
    slow: bool
    pairs: int
    p95_new_ms: float
    p95_old_ms: float
    ratio: float  # median of the per-pair ratios new/old
    slower_share: float
    p_value: float  # one-sided sign test: P(this many or more slower pairs | no difference)
    increase_ms: float = 0.0  # median per-pair increase


def sign_test_p(slower: int, n: int) -> float:
    """P(X >= slower) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, k) for k in range(slower, n + 1)) / 2.0**n if n else 1.0


class LatencyPairs:
    """Owns the probe thread and the pairs of one health window. Never affects what is served."""

    def __init__(self, new: ModelVersion, old: ModelVersion, interval_s: float = 0.05, max_pairs: int = 400) -> None:
        self.new, self.old = new, old
        self.interval_s, self.max_pairs = interval_s, max_pairs
        self.pairs: list[tuple[float, float]] = []  # (new seconds, old seconds)
        self._queue: queue.Queue[dict[str, np.ndarray] | None] = queue.Queue(maxsize=2)
        self._last = 0.0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="latency-pairs", daemon=True)
        self._thread.start()

    def offer(self, feeds: dict[str, np.ndarray], served_by: ModelVersion) -> None:
        """Called on the model's thread after each batch: queue a sample now and then, never wait."""
        now = time.monotonic()
        if served_by is not self.new or now - self._last < self.interval_s or len(self.pairs) >= self.max_pairs:
            return
        self._last = now
        with contextlib.suppress(queue.Full):  # behind: this sample is skipped, serving never waits
            self._queue.put_nowait(feeds)

    def _loop(self) -> None:
        flip = False
        while True:
            feeds = self._queue.get()
            if feeds is None:
                return
            try:
                order = (self.old, self.new) if flip else (self.new, self.old)
                times = {}
                for version in order:
                    t0 = time.perf_counter()
                    version.run(feeds)
                    times[id(version)] = time.perf_counter() - t0
                flip = not flip
                with self._lock:
                    self.pairs.append((times[id(self.new)], times[id(self.old)]))
            except Exception as e:  # a version failing here is judged by the error checks, not here
                log.debug("latency pair skipped: %s", e)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(10)

    def verdict(self, max_ratio: float, min_increase_ms: float, min_pairs: int = 10) -> PairedVerdict | None:
        """None with fewer than ``min_pairs`` pairs: latency is then not judged (no evidence)."""
        with self._lock:
            pairs = list(self.pairs)
        n = len(pairs)
        if n < min_pairs:
            return None
        new = np.array([p[0] for p in pairs]) * 1000
        old = np.array([p[1] for p in pairs]) * 1000
        p95_new, p95_old = float(np.percentile(new, 95)), float(np.percentile(old, 95))
        # The ratio judged is the median of the per-pair ratios: a preempted run (another process
        # took the core) lands in the tail of either side at random, and a p95 over a busy window
        # mostly measures that; within a pair both versions saw the same moment.
        ratio = float(np.median(new / np.maximum(old, 1e-6)))
        increase = float(np.median(new - old))
        slower = int((new > old).sum())
        p = sign_test_p(slower, n)
        slow = ratio > max_ratio and increase > min_increase_ms and p < 0.01
        return PairedVerdict(slow, n, p95_new, p95_old, ratio, slower / n, p, increase)
