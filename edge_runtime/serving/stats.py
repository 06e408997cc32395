"""Per-version live statistics: what each loaded version computed.

Rows, failed rows, rows with NaN/Inf, compute time per batch, and, for classifier-like outputs, a
histogram of top-1 classes (else the running mean of the first output). The agent's health
window (device/agent/health_window.py) compares a new version's figures with the previous one's.
"""

from __future__ import annotations

import threading
from collections import Counter, deque

import numpy as np

from edge_runtime.contracts.fleet import VersionFigures


class VersionStats:
    """Live figures of one loaded version (thread-safe); a snapshot is the contract's VersionFigures."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows = 0
        self.errors = 0
        self.nonfinite = 0
        self.latencies: deque[float] = deque(maxlen=2000)
        self.top1: Counter[int] = Counter()
        self.mean_sum = 0.0
        self.mean_n = 0
        self.batches = 0
        self.seconds = 0.0  # compute time summed over batches (a mean that adds up across devices)

    def record(self, rows: int, seconds: float, outputs: dict[str, np.ndarray]) -> int:
        """Count one batch; returns how many of its rows had NaN/Inf in the first output."""
        first = next(iter(outputs.values())) if outputs else np.zeros(0)
        bad = int((~np.isfinite(first.reshape(rows, -1))).any(axis=1).sum()) if first.dtype.kind == "f" and rows else 0
        with self._lock:
            self.rows += rows
            self.nonfinite += bad
            self.latencies.append(seconds)
            self.batches += 1
            self.seconds += seconds
            if first.ndim == 2 and first.shape[1] > 1 and first.shape[0] == rows:
                finite = np.isfinite(first).all(axis=1)
                self.top1.update(int(i) for i in first[finite].argmax(axis=1))
            elif first.size and np.isfinite(first).all():
                self.mean_sum += float(first.mean()) * rows
                self.mean_n += rows
        return bad

    def record_error(self, rows: int) -> None:
        with self._lock:
            self.rows += rows
            self.errors += rows

    def p95(self) -> float | None:
        with self._lock:
            return float(np.percentile(list(self.latencies), 95)) if self.latencies else None

    def snapshot(self) -> VersionFigures:
        with self._lock:
            return VersionFigures(
                rows=self.rows, errors=self.errors, nonfinite=self.nonfinite,
                p95_ms=(float(np.percentile(list(self.latencies), 95)) * 1000) if self.latencies else None,
                top1={str(k): v for k, v in self.top1.items()},
                mean=self.mean_sum / self.mean_n if self.mean_n else None,
                mean_sum=self.mean_sum, mean_n=self.mean_n, batches=self.batches, compute_s=self.seconds,
            )  # fmt: skip
