"""Shadow and A/B experiments on a device: a second version loaded beside the served one.

shadow  every batch the served version computes is queued for the shadow version, which runs
        the very same inputs off the request path; the answers are compared row by row (top-1
        agreement for classifier-like outputs, absolute difference of the first output) and
        both latencies are kept. Requests never wait for the shadow: when it falls behind, the
        batch is dropped from the comparison and counted.
ab      a fixed share of requests is routed to the variant (its own batcher), deterministically
        (request i goes to the variant when floor((i+1)p) > floor(ip)), so over n requests the
        variant gets round(n p) of them; each variant's figures are counted separately, from
        the moment the experiment started.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from edge_runtime.contracts.fleet import ExperimentKind, ExperimentReport, ShadowFigures
from edge_runtime.serving.batcher import Batcher, BatchObserver, BatchReport, BatchSettings
from edge_runtime.serving.stats import VersionStats
from edge_runtime.serving.versions import ModelVersion

log = logging.getLogger(__name__)

KINDS = ("shadow", "ab")


class ShadowStats:
    """Row-by-row comparison of the served and the shadow version's outputs on the same inputs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rows = 0  # rows both versions computed and were compared
        self.classified = 0  # of those, rows with a top-1 class on both sides
        self.agree = 0
        self.abs_diff_sum = 0.0
        self.abs_diff_n = 0
        self.max_abs_diff = 0.0
        self.dropped = 0  # rows the shadow did not get to (queue full)
        self.shadow_errors = 0

    def compare(self, served: np.ndarray, shadow: np.ndarray) -> None:
        rows = int(served.shape[0]) if served.ndim else 1
        a = served.reshape(rows, -1).astype(np.float64)
        b = shadow.reshape(rows, -1).astype(np.float64)
        with self._lock:
            self.rows += rows
            if a.shape == b.shape:
                both = np.isfinite(a) & np.isfinite(b)
                diff = np.abs(a - b)[both]
                if diff.size:
                    self.abs_diff_sum += float(diff.sum())
                    self.abs_diff_n += int(diff.size)
                    self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
                if served.ndim == 2 and served.shape[1] > 1:
                    ok = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
                    self.classified += int(ok.sum())
                    self.agree += int((a[ok].argmax(axis=1) == b[ok].argmax(axis=1)).sum())

    def snapshot(self) -> ShadowFigures:
        with self._lock:
            return ShadowFigures(
                rows=self.rows,
                classified=self.classified,
                agree_top1=self.agree,
                top1_agreement=self.agree / self.classified if self.classified else None,
                abs_diff_sum=self.abs_diff_sum,
                abs_diff_n=self.abs_diff_n,
                mean_abs_diff=self.abs_diff_sum / self.abs_diff_n if self.abs_diff_n else None,
                max_abs_diff=self.max_abs_diff,
                dropped=self.dropped,
                shadow_errors=self.shadow_errors,
            )


class Experiment:
    """One running experiment of a model; created and ended by the Runtime."""

    def __init__(
        self,
        kind: str,
        served: str,
        variant: ModelVersion,
        split: float = 0.0,
        settings: BatchSettings | None = None,
        rows_of: Callable[[dict[str, np.ndarray]], int] = lambda feeds: 1,
        name: str = "",
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"experiment kind must be one of {KINDS}, got {kind!r}")
        if kind == "ab" and not 0.0 <= split <= 1.0:
            raise ValueError(f"A/B split must be a share between 0 and 1, got {split}")
        self.kind, self.variant, self.split = kind, variant, split
        self.served = served
        self.stats: dict[str, VersionStats] = {served: VersionStats(), variant.version: VersionStats()}
        self.shadow = ShadowStats()
        self._count = 0
        self._lock = threading.Lock()
        self._rows_of = rows_of
        # A/B: the variant serves its share through its own batcher (a batch never mixes versions).
        self.batcher: Batcher | None = (
            Batcher(
                self._run_variant,
                settings or BatchSettings(),
                BatchObserver(after_batch=self._after_variant),
                name=f"{name}-ab",
            )
            if kind == "ab"
            else None
        )
        self._queue: queue.Queue[tuple[dict[str, np.ndarray], np.ndarray] | None] = queue.Queue(maxsize=64)
        self._worker: threading.Thread | None = None
        if kind == "shadow":
            self._worker = threading.Thread(target=self._shadow_loop, name="shadow", daemon=True)
            self._worker.start()

    @property
    def version(self) -> str:
        return self.variant.version

    def route_to_variant(self) -> bool:
        """A/B: whether the next request goes to the variant (an exact share, no randomness)."""
        with self._lock:
            i = self._count
            self._count += 1
        return math.floor((i + 1) * self.split) > math.floor(i * self.split)

    def observe_served(self, version: str, rows: int, seconds: float, feeds: dict[str, np.ndarray],
                       outputs: dict[str, np.ndarray]) -> None:  # fmt: skip
        stats = self.stats.get(version)
        if stats is not None:
            stats.record(rows, seconds, outputs)
        if self.kind == "shadow" and version == self.served and outputs:
            try:
                self._queue.put_nowait((feeds, next(iter(outputs.values()))))
            except queue.Full:
                with self.shadow._lock:
                    self.shadow.dropped += rows

    def _run_variant(self, feeds: dict[str, np.ndarray], instance: int) -> tuple[dict[str, np.ndarray], None]:
        """A/B: one batch routed to the variant (the model's thread: run only)."""
        try:
            return self.variant.run(feeds, instance % self.variant.instances), None
        except Exception:
            rows = self._rows_of(feeds)
            self.variant.stats.record_error(rows)
            self.observe_error(self.version, rows)
            raise

    def _after_variant(self, report: BatchReport) -> None:
        """A/B: count a batch the variant computed (the batcher's post thread)."""
        if report.outputs is None:
            return
        self.variant.stats.record(report.rows, report.compute_s, report.outputs)
        self.observe_served(self.version, report.rows, report.compute_s, report.feeds, report.outputs)

    def observe_error(self, version: str, rows: int) -> None:
        stats = self.stats.get(version)
        if stats is not None:
            stats.record_error(rows)

    def _shadow_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            feeds, served = item
            rows = int(served.shape[0]) if served.ndim else 1
            t0 = time.perf_counter()
            try:
                out = self.variant.run(feeds)
            except Exception as e:  # the shadow failing never touches serving
                log.warning("shadow %s failed: %s", self.variant.version, e)
                self.stats[self.variant.version].record_error(rows)
                with self.shadow._lock:
                    self.shadow.shadow_errors += rows
                continue
            self.stats[self.variant.version].record(rows, time.perf_counter() - t0, out)
            self.shadow.compare(served, next(iter(out.values())))

    def snapshot(self) -> ExperimentReport:
        ab = self.kind == "ab"
        return ExperimentReport(
            kind=ExperimentKind(self.kind),
            served=self.served,
            variant=self.variant.version,
            variants={v: s.snapshot() for v, s in self.stats.items()},
            split=self.split if ab else None,
            shadow=None if ab else self.shadow.snapshot(),
        )

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close(drain=True)
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(30)
        # The variant itself is freed by the Runtime (it may become the served version).
