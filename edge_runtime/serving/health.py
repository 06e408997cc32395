"""Per-version live statistics and the health window's verdict.

Each loaded version records what it computes: rows, failed rows, rows with NaN/Inf, compute
time per batch, and, for classifier-like outputs, a histogram of top-1 classes (else the
running mean of the first output). After an update the new version's figures are compared
with the previous version's on the same device and traffic: error rate, p95 latency ratio,
output drift (total variation distance of top-1 classes, or relative shift of the mean).
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np


class VersionStats:
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

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"rows": self.rows, "errors": self.errors, "nonfinite": self.nonfinite,
                    "p95_ms": (float(np.percentile(list(self.latencies), 95)) * 1000) if self.latencies else None,
                    "top1": dict(self.top1), "mean": self.mean_sum / self.mean_n if self.mean_n else None,
                    "mean_sum": self.mean_sum, "mean_n": self.mean_n, "batches": self.batches,
                    "compute_s": self.seconds}  # fmt: skip


@dataclass(frozen=True)
class HealthPolicy:
    window_s: float = 30.0
    min_inferences: int = 20
    max_error_rate: float = 0.02
    max_p95_ratio: float = 3.0
    # A p95 regression counts only above this absolute increase: sub-millisecond jitter is noise
    # on a shared CPU (a good version was once judged 4.5x slower on 14 samples of 0.1 ms).
    min_p95_increase_ms: float = 0.5
    max_drift: float = 0.3
    min_baseline: int = 20

    @classmethod
    def from_dict(cls, d: dict[str, object] | None) -> HealthPolicy:
        if not d:
            return cls()
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


@dataclass
class Verdict:
    healthy: bool
    reason: str
    figures: dict[str, object] = field(default_factory=dict)
    kind: str = ""  # what failed: "errors", "latency" or "drift"


def evaluate(policy: HealthPolicy, baseline: VersionStats | None, current: VersionStats) -> Verdict:
    cur = current.snapshot()
    rows = int(cur["rows"])  # type: ignore[call-overload]
    figures: dict[str, object] = {"new": cur, "old": baseline.snapshot() if baseline else None}
    if rows == 0:
        return Verdict(True, "no traffic during the window", figures)
    errors, nonfinite = int(cur["errors"]), int(cur["nonfinite"])  # type: ignore[call-overload]
    error_rate = (errors + nonfinite) / rows  # one snapshot: counts and rows from the same moment
    figures["error_rate"] = error_rate
    if errors and errors == rows:
        return Verdict(False, f"every inference failed ({errors} of {rows})", figures, "errors")
    if error_rate > policy.max_error_rate:
        what = "NaN/Inf outputs" if nonfinite >= errors else "failed inferences"
        return Verdict(
            False, f"error rate {error_rate:.1%} ({what}) over {policy.max_error_rate:.1%}", figures, "errors"
        )
    if baseline is not None and baseline.rows >= policy.min_baseline:
        old_p95, new_p95 = baseline.p95(), current.p95()
        if old_p95 and new_p95:
            ratio = new_p95 / old_p95
            figures["p95_ratio"] = ratio
            figures["p95_increase_ms"] = (new_p95 - old_p95) * 1000
            if ratio > policy.max_p95_ratio and (new_p95 - old_p95) * 1000 > policy.min_p95_increase_ms:
                return Verdict(
                    False, f"p95 latency {ratio:.1f}x the previous version's (limit {policy.max_p95_ratio}x)", figures
                )
        drift = _drift(baseline, current)
        if drift is not None:
            figures["drift"] = drift
            if drift > policy.max_drift:
                return Verdict(
                    False, f"output drift {drift:.2f} over {policy.max_drift} against the previous version", figures
                )
    return Verdict(True, "healthy", figures)


def _drift(old: VersionStats, new: VersionStats) -> float | None:
    if sum(old.top1.values()) >= 10 and sum(new.top1.values()) >= 10:
        keys = set(old.top1) | set(new.top1)
        n_old, n_new = sum(old.top1.values()), sum(new.top1.values())
        return 0.5 * sum(abs(old.top1[k] / n_old - new.top1[k] / n_new) for k in keys)
    if old.mean_n and new.mean_n:
        a, b = old.mean_sum / old.mean_n, new.mean_sum / new.mean_n
        return abs(b - a) / (abs(a) + 1e-6)
    return None
