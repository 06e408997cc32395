"""What the calibration data looked like, recorded in the bundle so that a device can tell when its
sensors drift away from it: per input and channel, mean, std, min, max and a 16-bin histogram over
the calibration range (``quantization.input_stats`` in the manifest). An INT8 model clamps inputs
outside the range it was calibrated on without a trace; these figures are the reference to
compare live inputs with.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edge_runtime.pack.datasets import Sample

BINS = 16


def input_stats(samples: list[Sample], layout: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in samples[0].feeds:
        raw = np.concatenate([np.atleast_1d(s.feeds[name]) for s in samples])
        if raw.dtype.kind != "f" or raw.size == 0:
            continue
        a = raw.astype(np.float64)
        axis = (1 if layout != "nhwc" else 3) if a.ndim == 4 else None
        rows = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1) if axis is not None else a.reshape(1, -1)
        lo, hi = float(a.min()), float(a.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1.0, BINS + 1)
        channels = []
        for r in rows:
            hist = np.histogram(r, bins=edges)[0]
            channels.append({"mean": round(float(r.mean()), 6), "std": round(float(r.std()), 6),
                             "min": round(float(r.min()), 6), "max": round(float(r.max()), 6),
                             "hist": [round(float(h), 4) for h in hist / max(1, r.size)]})  # fmt: skip
        out[name] = {"axis": axis, "samples": len(samples), "edges": [round(float(e), 6) for e in edges],
                     "channels": channels}  # fmt: skip
    return out


def constant_inputs(samples: list[Sample]) -> dict[str, float]:
    """Inputs whose every calibration value is the same (all-black images): {name: value}."""
    out = {}
    for name in samples[0].feeds:
        a = np.concatenate([np.atleast_1d(s.feeds[name]) for s in samples])
        if a.dtype.kind == "f" and a.size > 1 and float(a.max()) == float(a.min()):
            out[name] = float(a.flat[0])
    return out
