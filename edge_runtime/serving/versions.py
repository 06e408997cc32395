"""One loaded, warmed version of a model, and the sample it is warmed with.

A version is loaded once (one backend session per instance, created from the verified bundle's
bytes; N instances are Triton's instance group, each run by its own batcher thread), warmed with
a real sample shipped in its bundle (or zeros of its input shapes), and counts its in-flight
runs so that a hot swap can drain it before freeing it. It never batches and never decides
which version serves: the ModelHandle does that.
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np

from edge_runtime.backends import Backend, BackendOptions, create_backend
from edge_runtime.contracts.bundle import Bundle, BundleManifest
from edge_runtime.serving.input_range import CalibrationRanges
from edge_runtime.serving.stats import VersionStats


class ModelVersion:
    """One loaded, warmed version of a model. Counts in-flight runs so a swap can drain it."""

    def __init__(self, bundle: Bundle, options: BackendOptions, instances: int = 1) -> None:
        self.manifest: BundleManifest = bundle.manifest
        self.bundle_sha256 = bundle.sha256
        t0 = time.perf_counter()
        self.backends: list[Backend] = [
            create_backend(self.manifest.runtime, bundle.model_bytes, options) for _ in range(max(1, instances))
        ]
        self.backend: Backend = self.backends[0]
        self.load_s = time.perf_counter() - t0
        self.output_names = [o.name for o in self.manifest.outputs]
        self.input_names = [i.name for i in self.manifest.inputs]
        self.stats = VersionStats()
        self.calibration_ranges = CalibrationRanges.from_manifest(self.manifest.quantization)
        self._inflight = 0
        self._idle = threading.Condition()
        self.warmup = _warmup_sample(bundle)
        t0 = time.perf_counter()
        if self.warmup is not None:
            for i in range(len(self.backends)):
                self.run(self.warmup, i)
        self.warm_s = time.perf_counter() - t0

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def instances(self) -> int:
        return len(self.backends)

    def run(self, feeds: dict[str, np.ndarray], instance: int = 0) -> dict[str, np.ndarray]:
        with self._idle:
            self._inflight += 1
        try:
            if list(feeds) != self.input_names and set(feeds) == set(self.input_names):
                feeds = {n: feeds[n] for n in self.input_names}  # backends may take inputs by position
            return dict(zip(self.output_names, self.backends[instance].run(feeds), strict=True))
        finally:
            with self._idle:
                self._inflight -= 1
                if not self._inflight:
                    self._idle.notify_all()

    def drain(self, timeout: float = 60.0) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


def _warmup_sample(bundle: Bundle) -> dict[str, np.ndarray] | None:
    name = bundle.manifest.batching.warmup
    if name and name in bundle.files:
        with np.load(io.BytesIO(bundle.files[name]), allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    m = bundle.manifest
    if m.preprocess is not None and len(m.inputs) == 1:
        w, h = m.preprocess.size
        shape = [1, 3, h, w] if m.preprocess.layout == "nchw" else [1, h, w, 3]
        return {m.inputs[0].name: np.zeros(shape, m.inputs[0].dtype)}
    feeds = {}
    for spec in m.inputs:
        if any(isinstance(d, str) for d in spec.shape[1:]):
            return None  # free spatial dims and no sample: nothing safe to warm with
        shape = [1 if isinstance(d, str) else d for d in spec.shape]
        feeds[spec.name] = np.zeros(shape, spec.dtype)
    return feeds
