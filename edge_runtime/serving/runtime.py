"""The in-process API: load verified bundles, keep them resident and warm, infer, hot-swap.

A model is loaded once and warmed with a real sample shipped in its bundle, so the first
real request is not slow; it is never reloaded per request. ``swap`` loads and warms the new
version beside the old one, switches atomically, lets in-flight work finish on the old one,
then frees it. The daemon, the agent and scripts all drive models through this class.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.backends import BackendOptions
from edge_runtime.contracts.bundle import Bundle, BundleManifest, TensorSpec, read_bundle
from edge_runtime.contracts.fleet import ExperimentReport
from edge_runtime.serving.batcher import Batcher, BatchObserver, BatchReport, BatchSettings, Sink
from edge_runtime.serving.cache import PredictionCache
from edge_runtime.serving.experiments import Experiment
from edge_runtime.serving.frames import frames_to_input, is_raw_frame, raw_frame_input
from edge_runtime.serving.metrics import BATCH_BUCKETS, Registry, rss_bytes
from edge_runtime.serving.tensors import InputError, check_inputs
from edge_runtime.serving.versions import ModelVersion

log = logging.getLogger(__name__)


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


def batch_settings_for(manifest: BundleManifest, base: BatchSettings) -> BatchSettings:
    """Narrow the configured settings to what the model can take; resolve instances 0 (auto)."""
    b = manifest.batching
    instances = base.instances or default_instances()
    if not b.batchable:
        return BatchSettings(1, 0.0, (), base.max_queue, base.timeout_ms, False, instances, base.inline_max_ms)
    cap = b.max_batch
    max_batch = min(base.max_batch, cap) if cap else base.max_batch
    preferred = tuple(p for p in base.preferred if p <= max_batch)
    return BatchSettings(
        max_batch, base.max_delay_ms, preferred, base.max_queue, base.timeout_ms, True, instances, base.inline_max_ms
    )


class Runtime:
    """Resident, warmed models behind one API.

    >>> rt = Runtime(trusted_keys=load_public_keys([Path("keys/signing.pub")]))
    >>> rt.load(Path("orientation-1.0.0-x86-cpu.edgepkg"))
    >>> rt.infer("orientation", {"x": batch})["fetch_name_0"]
    """

    def __init__(
        self,
        trusted_keys: Iterable[Ed25519PublicKey],
        threads: int = 0,
        batching: BatchSettings | None = None,
        metrics: RuntimeMetrics | None = None,
        delegate: str | None = None,
        spin: bool = True,
    ) -> None:
        self.trusted_keys = list(trusted_keys)
        self.spin = spin
        self.threads = threads
        self.batching = batching or BatchSettings()
        self.metrics = metrics or RuntimeMetrics()
        self.delegate = delegate
        self._models: dict[str, ModelHandle] = {}
        self._lock = threading.Lock()
        # Queue depth is read when /metrics is scraped: exact at that moment (it used to keep the
        # value of the last submit, never falling back to 0), and no work per request.
        self.metrics.registry.on_collect(self._observe_queues)

    def _observe_queues(self) -> None:
        for handle in self.models():
            handle.batcher.drain_reports()  # statistics of batches already answered, counted first
            exp = handle.experiment
            if exp is not None and exp.batcher is not None:
                exp.batcher.drain_reports()
            self.metrics.queue_depth.set(handle.batcher.depth, model=handle.name)

    # --- loading -----------------------------------------------------------------------

    def _open(self, source: Path | bytes | Bundle) -> Bundle:
        if isinstance(source, Bundle):
            return source
        return read_bundle(source, self.trusted_keys, check_external_data=False)  # loaded from bytes below

    def _load_version(self, bundle: Bundle, instances: int = 1) -> ModelVersion:
        m = bundle.manifest
        threads = self.threads
        if not threads and instances > 1:  # share the cores between the instances
            threads = max(1, (os.cpu_count() or 1) // instances)
        opts = BackendOptions(
            threads=threads,
            providers=list(m.runtime_options.providers or ["CPUExecutionProvider"]),
            provider_options=dict(m.runtime_options.provider_options),
            delegate=self.delegate,
            spin=self.spin,
        )
        version = ModelVersion(bundle, opts, instances)
        self.metrics.load_s.set(version.load_s, model=m.name, version=m.version)
        self.metrics.warm_s.set(version.warm_s, model=m.name, version=m.version)
        self.metrics.loaded.set(1, model=m.name, version=m.version)
        log.info(
            "loaded %s %s, %d instance(s) (load %.0f ms, warm-up %.0f ms, providers %s)",
            m.name,
            m.version,
            instances,
            version.load_s * 1000,
            version.warm_s * 1000,
            version.backend.active_providers,
        )
        return version

    def load(
        self, source: Path | bytes | Bundle, settings: BatchSettings | None = None, cache: PredictionCache | None = None
    ) -> ModelHandle:
        """Verify, load and warm a bundle; returns once the model is ready to answer."""
        bundle = self._open(source)
        name = bundle.manifest.name
        with self._lock:
            if name in self._models:
                raise ValueError(f"model {name!r} is already loaded; use swap() to change its version")
        resolved = batch_settings_for(bundle.manifest, settings or self.batching)
        version = self._load_version(bundle, resolved.instances)
        handle = ModelHandle(name, version, resolved, self.metrics)
        handle.cache = cache
        with self._lock:
            self._models[name] = handle
        return handle

    def swap(self, source: Path | bytes | Bundle, drain_timeout: float = 60.0, keep_old: bool = False) -> str:
        """Load and warm a new version beside the serving one, switch, drain, free. Returns the old version.

        When that version is already the warm standby (``prepare``), the switch is instant. With
        ``keep_old`` the replaced version stays loaded as the standby: switching back is instant too.
        """
        bundle = self._open(source)
        handle = self.get(bundle.manifest.name)
        with handle._swap_lock:
            old = handle.current
            if [i.model_dump() for i in bundle.manifest.inputs] != [i.model_dump() for i in old.manifest.inputs]:
                raise InputError(
                    f"cannot hot-swap {handle.name}: inputs of {bundle.manifest.version} differ from {old.version}"
                )
            standby = handle.standby
            if standby is not None and standby.bundle_sha256 == bundle.sha256:
                new, handle.standby = standby, None
                new.stats = type(new.stats)()  # judged on what it serves from now on
            else:
                new = self._load_version(bundle, handle.settings.instances)
            handle.current = new  # atomic: the next batch runs on the new version
            handle.previous = old
            if keep_old:
                if handle.standby is not None:
                    self._free(handle.name, handle.standby)
                handle.standby = old
            else:
                if not old.drain(drain_timeout):
                    log.warning("version %s still busy after %.0f s; freeing anyway", old.version, drain_timeout)
                self._free(handle.name, old)
            self.metrics.swaps.inc(model=handle.name)
            log.info("swapped %s %s -> %s", handle.name, old.version, new.version)
            return old.version

    def _free(self, name: str, version: ModelVersion) -> None:
        version.close()
        handle = self._models.get(name)
        resident = [handle.current, handle.standby] if handle else []
        if handle and handle.experiment:
            resident.append(handle.experiment.variant)
        if not any(v is not None and v is not version and v.version == version.version for v in resident):
            self.metrics.loaded.remove(model=name, version=version.version)

    def prepare(self, source: Path | bytes | Bundle) -> ModelVersion:
        """Load and warm a version as the standby of a served model (blue-green); it serves nothing
        until ``swap`` switches to it. Replaces a different standby; the same one is kept."""
        bundle = self._open(source)
        handle = self.get(bundle.manifest.name)
        with handle._swap_lock:
            if handle.standby is not None and handle.standby.bundle_sha256 == bundle.sha256:
                return handle.standby
            if handle.current.bundle_sha256 == bundle.sha256:
                raise ValueError(f"{handle.name} {bundle.manifest.version} is already the served version")
            new = self._load_version(bundle, handle.settings.instances)
            old, handle.standby = handle.standby, new
        if old is not None:
            self._free(handle.name, old)
        return new

    def release_standby(self, name: str) -> None:
        handle = self.get(name)
        with handle._swap_lock:
            old, handle.standby = handle.standby, None
        if old is not None:
            self._free(name, old)

    def start_experiment(self, source: Path | bytes | Bundle, kind: str, split: float = 0.0) -> Experiment:
        """Load a variant beside the served version: ``shadow`` (runs the same inputs, serves nothing)
        or ``ab`` (serves the share ``split`` of requests). Replaces a running experiment."""
        bundle = self._open(source)
        handle = self.get(bundle.manifest.name)
        if [i.model_dump() for i in bundle.manifest.inputs] != [i.model_dump() for i in handle.inputs]:
            raise InputError(f"variant {bundle.manifest.version} of {handle.name} has different inputs")
        self.stop_experiment(handle.name)
        exp = Experiment(
            kind,
            handle.current.version,
            self._load_version(bundle, handle.settings.instances),
            split,
            handle.settings,
            handle.rows_of,
            handle.name,
        )
        handle.experiment = exp
        log.info("%s experiment on %s: %s beside %s", kind, handle.name, exp.version, exp.served)
        return exp

    def stop_experiment(self, name: str) -> ExperimentReport | None:
        """End the model's experiment; returns its final figures (None if there was none)."""
        handle = self.get(name)
        exp, handle.experiment = handle.experiment, None
        if exp is None:
            return None
        figures = exp.snapshot()
        exp.close()
        self._free(name, exp.variant)
        return figures

    def unload(self, name: str) -> None:
        with self._lock:
            handle = self._models.pop(name, None)
        if handle is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        handle.batcher.close(drain=True)
        if handle.experiment is not None:
            handle.experiment.close()
            handle.experiment.variant.close()
        if handle.standby is not None:
            handle.standby.close()
        handle.current.close()
        self.metrics.loaded.remove(model=name, version=handle.current.version)

    def close(self) -> None:
        for name in list(self._models):
            self.unload(name)

    # --- serving -----------------------------------------------------------------------

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
