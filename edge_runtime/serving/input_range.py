"""Inputs outside the range a model was calibrated on.

An INT8 model clamps what lies outside the activation ranges it was calibrated with, without a
trace: a sensor that drifts (a camera's exposure, a microphone's gain) gets confident answers from
inputs the model never saw. The packer records the calibration data's per-channel statistics in the
bundle (``quantization.input_stats``: min and max per channel, among others); this module holds
those ranges for a loaded version and counts, per batch, the rows whose input goes outside them.
It runs on the batcher's post thread, off the model's critical path (two reductions per input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Slack for the recorded figures' rounding (6 decimals) and float noise: a value this far past a
# bound, relative to the channel's calibration range, is not counted.
TOLERANCE = 1e-4


@dataclass(frozen=True)
class ChannelRange:
    axis: int | None  # the channel axis of the batched input; None: one range for the whole tensor
    lo: np.ndarray  # per channel
    hi: np.ndarray


class CalibrationRanges:
    """Per input, the calibration range of each channel; ``outside`` counts rows beyond them."""

    def __init__(self, ranges: dict[str, ChannelRange]) -> None:
        self.ranges = ranges

    @classmethod
    def from_manifest(cls, quantization: dict[str, Any] | None) -> CalibrationRanges | None:
        """From a manifest's ``quantization`` block; None when it records no input statistics (TFLite
        bundles, bundles packed before they were recorded) or records them in a shape this code does
        not know. fp32 ONNX bundles record them too: they do not clamp, but such inputs are still
        ones the model was not checked on, and are counted the same way."""
        stats = (quantization or {}).get("input_stats")
        if not isinstance(stats, dict):
            return None
        ranges: dict[str, ChannelRange] = {}
        for name, s in stats.items():
            try:
                channels = s["channels"]
                lo = np.array([float(c["min"]) for c in channels], np.float64)
                hi = np.array([float(c["max"]) for c in channels], np.float64)
                axis = s.get("axis")
            except (KeyError, TypeError, ValueError):
                continue
            if len(lo) and (axis is None or isinstance(axis, int)):
                slack = TOLERANCE * np.maximum(hi - lo, 1.0)
                ranges[name] = ChannelRange(axis, lo - slack, hi + slack)
        return cls(ranges) if ranges else None

    def outside(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """{input: rows (along axis 0) with any value outside its channel's calibration range}."""
        out: dict[str, int] = {}
        for name, r in self.ranges.items():
            a = feeds.get(name)
            if a is None or a.dtype.kind != "f" or a.ndim < 1 or a.size == 0:
                continue
            if r.axis is None or len(r.lo) == 1:
                rows = a.reshape(a.shape[0], -1)
                lows, highs = rows.min(axis=1, keepdims=True), rows.max(axis=1, keepdims=True)
                lo, hi = r.lo[:1], r.hi[:1]
            else:
                if not 0 < r.axis < a.ndim or a.shape[r.axis] != len(r.lo):
                    continue  # not the layout the statistics were taken in
                rest = tuple(i for i in range(1, a.ndim) if i != r.axis)
                lows, highs = a.min(axis=rest), a.max(axis=rest)  # [rows, channels]
                lo, hi = r.lo, r.hi
            bad = ((lows < lo) | (highs > hi) | ~np.isfinite(lows) | ~np.isfinite(highs)).any(axis=1)
            out[name] = int(bad.sum())
        return out
