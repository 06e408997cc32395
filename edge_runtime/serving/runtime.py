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
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.backends import BackendOptions
from edge_runtime.contracts.bundle import Bundle, read_bundle
from edge_runtime.contracts.fleet import ExperimentReport
from edge_runtime.serving.batcher import BatchSettings
from edge_runtime.serving.cache import PredictionCache
from edge_runtime.serving.experiments import Experiment
from edge_runtime.serving.handles import (
    ModelHandle,
    ModelNotFoundError,
    RuntimeMetrics,
    Submission,
    batch_settings_for,
    default_instances,
)
from edge_runtime.serving.requests import RequestPath
from edge_runtime.serving.tensors import InputError
from edge_runtime.serving.versions import ModelVersion

log = logging.getLogger(__name__)


class Runtime(RequestPath):
    """Resident, warmed models behind one API: this class loads, swaps and frees versions; the
    request path (admission, routing, queueing, ``infer``) is RequestPath's.

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


__all__ = ["ModelHandle", "ModelNotFoundError", "Runtime", "RuntimeMetrics", "Submission", "batch_settings_for",
           "default_instances"]  # fmt: skip
