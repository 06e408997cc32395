"""A served model's handle (the current version, its batcher, what each batch did), the figures the
runtime keeps, and how a model's batching is resolved from the configuration and its manifest."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from edge_runtime.contracts.bundle import BundleManifest, TensorSpec
from edge_runtime.serving.batcher import Batcher, BatchObserver, BatchReport, BatchSettings
from edge_runtime.serving.cache import PredictionCache
from edge_runtime.serving.experiments import Experiment
from edge_runtime.serving.metrics import BATCH_BUCKETS, Registry, rss_bytes
from edge_runtime.serving.versions import ModelVersion


@dataclass(frozen=True)
class Submission:
    """A queued request: the version it was routed to and the future of its outputs."""

    future: Future[dict[str, np.ndarray]]
    version: str

    def result(self, timeout: float | None = None) -> dict[str, np.ndarray]:
        return self.future.result(timeout)


class ModelNotFoundError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class RuntimeMetrics:
    registry: Registry = field(default_factory=Registry)

    def __post_init__(self) -> None:
        r = self.registry
        m = ("model",)
        self.requests = r.counter("edgert_requests_total", "Inference requests received", m)
        self.failures = r.counter("edgert_request_failures_total", "Requests that failed (model error)", m)
        self.rejected = r.counter(
            "edgert_requests_rejected_total", "Requests refused (queue full, bad input)", ("model", "reason")
        )
        self.expired = r.counter("edgert_requests_expired_total", "Requests dropped after their timeout", m)
        self.nonfinite = r.counter("edgert_nonfinite_outputs_total", "Results holding NaN or Inf", m)
        self.outside_calibration = r.counter(
            "edgert_inputs_outside_calibration_total",
            "Rows of input outside the per-channel range of the bundle's calibration data (INT8 clamps them)",
            ("model", "input"),
        )
        self.queue_depth = r.gauge("edgert_queue_depth", "Requests waiting in the batcher", m)
        self.batch_size = r.histogram("edgert_batch_size", "Rows per executed batch", m, BATCH_BUCKETS)
        self.queue_s = r.histogram("edgert_queue_seconds", "Time from enqueue to execution", m)
        self.compute_s = r.histogram("edgert_compute_seconds", "Backend time per batch", m)
        self.total_s = r.histogram("edgert_request_seconds", "Time from enqueue to result", m)
        self.load_s = r.gauge("edgert_model_load_seconds", "Time to verify and load the model", ("model", "version"))
        self.warm_s = r.gauge("edgert_model_warmup_seconds", "Time of the warm-up inference", ("model", "version"))
        self.loaded = r.gauge("edgert_model_loaded", "1 for each resident model version", ("model", "version"))
        self.swaps = r.counter("edgert_model_swaps_total", "Hot swaps completed", m)
        self.rss = r.gauge("edgert_process_resident_memory_bytes", "Resident set size of the process")
        self.cache_hits = r.counter("edgert_cache_hits_total", "Requests answered from the prediction cache", m)
        self.cache_misses = r.counter("edgert_cache_misses_total", "Cacheable requests that were computed", m)
        self.lone = r.counter(
            "edgert_lone_requests_total",
            "Requests that found the model idle and were answered without a queue hand-off back (HTTP: awaited"
            " on the event loop; Python API: run on the caller's thread)",
            m,
        )
        self.raw_frames = r.counter(
            "edgert_raw_frames_total", "Requests sent as raw uint8 frames and preprocessed on the device", m
        )
        r.on_collect(lambda: self.rss.set(rss_bytes()))


class ModelHandle:
    """A served model: the current version (swapped atomically) and its batcher.

    The batcher's threads only run batches (``_run``); what a batch did is counted afterwards on
    the batcher's post thread (``_after_batch``): metrics, per-version statistics, the experiment's
    figures and the health window's latency probe."""

    def __init__(self, name: str, current: ModelVersion, settings: BatchSettings, metrics: RuntimeMetrics) -> None:
        self.name = name
        self.current = current
        self.settings = settings
        self._metrics = metrics
        self._swap_lock = threading.Lock()
        observer = BatchObserver(
            after_batch=self._after_batch,
            on_expired=lambda: metrics.expired.inc(model=name),
            on_progress=self._touch,
        )
        self.last_progress = time.monotonic()
        self.cache: PredictionCache | None = None
        self.previous: ModelVersion | None = None  # the version a swap replaced (health baseline)
        self.standby: ModelVersion | None = None  # loaded and warm beside the served one, not serving (blue-green)
        self.experiment: Experiment | None = None  # shadow or A/B variant
        # Called after each batch the served version computed (feeds, that version): the health
        # window's paired latency probe. Must return at once (it only queues).
        self.on_served: Callable[[dict[str, np.ndarray], ModelVersion], None] | None = None
        self.batcher = Batcher(self._run, settings, observer, name)
        self.batcher.single_s = current.warm_s or None  # the warm-up run: a first estimate, on the high side

    @property
    def manifest(self) -> BundleManifest:
        return self.current.manifest

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.current.manifest.inputs

    def _touch(self) -> None:
        self.last_progress = time.monotonic()

    def _run(self, feeds: dict[str, np.ndarray], instance: int) -> tuple[dict[str, np.ndarray], ModelVersion]:
        """The model's thread: run the batch on the current version, nothing else."""
        version = self.current  # read once: a swap mid-batch cannot mix versions
        try:
            return version.run(feeds, instance % version.instances), version
        except Exception:
            rows = self.rows_of(feeds)
            version.stats.record_error(rows)
            exp = self.experiment
            if exp is not None:
                exp.observe_error(version.version, rows)
            raise

    def _after_batch(self, report: BatchReport) -> None:
        """The post thread: count what one batch did."""
        m, name = self._metrics, self.name
        if report.error is not None or report.outputs is None:
            m.failures.inc(len(report.enqueued), model=name)
            return
        version: ModelVersion = report.tag
        out, rows, seconds = report.outputs, report.rows, report.compute_s
        m.batch_size.observe(rows, model=name)
        m.compute_s.observe(seconds, model=name)
        done = report.started + seconds
        for enqueued in report.enqueued:
            m.queue_s.observe(report.started - enqueued, model=name)
            m.total_s.observe(done - enqueued, model=name)
        bad = version.stats.record(rows, seconds, out)  # scans the first output once
        exp = self.experiment
        if exp is not None:
            exp.observe_served(version.version, rows, seconds, report.feeds, out)
        probe = self.on_served
        if probe is not None:
            probe(report.feeds, version)
        if version.calibration_ranges is not None:
            for input_name, n in version.calibration_ranges.outside(report.feeds).items():
                if n:
                    m.outside_calibration.inc(n, model=name, input=input_name)
        others = list(out.values())[1:]
        if bad or any(v.dtype.kind == "f" and not np.isfinite(v).all() for v in others):
            m.nonfinite.inc(model=name)

    def rows_of(self, feeds: dict[str, np.ndarray]) -> int:
        first = next(iter(feeds.values()))
        return int(first.shape[0]) if first.ndim and self.settings.batchable else 1


def default_instances(cores: int | None = None) -> int:
    """Instances of a model when the configuration leaves it at 0 (auto): one below 4 cores, else one
    per two cores (each with two threads), at most 4. Measured on 2 cores (bench_dataplane, orientation
    fp32): a lone request takes 2.4 ms on one 2-thread instance and 3.7 ms on one of two 1-thread
    instances, while 32 clients get 543/s from two instances against 492/s from one. Small devices
    answer a camera at a time, so latency wins below 4 cores; set ``instances: 2`` for throughput."""
    cores = cores or os.cpu_count() or 1
    return 1 if cores < 4 else min(4, cores // 2)


def batch_settings_for(manifest: BundleManifest, base: BatchSettings, cores: int | None = None) -> BatchSettings:
    """Narrow the configured settings to what the model can take; resolve instances 0 (auto) from the
    bundle and the cores: a bundle declared stateful gets one instance, so its requests run one at a
    time and in order (two instances would run a client's pipelined requests side by side); any
    other model gets ``default_instances`` of this device's cores. A number set in the
    configuration is taken as it is."""
    b = manifest.batching
    instances = base.instances or (1 if b.stateful else default_instances(cores))
    if not b.batchable:
        return BatchSettings(1, 0.0, (), base.max_queue, base.timeout_ms, False, instances, base.inline_max_ms)
    cap = b.max_batch
    max_batch = min(base.max_batch, cap) if cap else base.max_batch
    preferred = tuple(p for p in base.preferred if p <= max_batch)
    return BatchSettings(
        max_batch, base.max_delay_ms, preferred, base.max_queue, base.timeout_ms, True, instances, base.inline_max_ms
    )
