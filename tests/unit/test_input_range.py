"""Counting inputs outside the calibration range (serving/input_range.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.serving.input_range import CalibrationRanges

pytestmark = pytest.mark.unit


def _stats(axis: int | None, mins: list[float], maxs: list[float]) -> dict[str, object]:
    return {"input_stats": {"x": {"axis": axis, "samples": 8, "edges": [],
                                  "channels": [{"min": lo, "max": hi} for lo, hi in zip(mins, maxs, strict=True)]}}}  # fmt: skip


def test_rows_with_any_channel_outside_its_own_range_are_counted() -> None:
    ranges = CalibrationRanges.from_manifest(_stats(1, [0, -1, 0], [1, 1, 10]))
    assert ranges is not None
    x = np.full((5, 3, 4, 4), 0.5, np.float32)
    x[1, 2, 0, 0] = 9.0  # channel 2 reaches 10: inside
    x[2, 0, 3, 3] = 1.5  # channel 0 stops at 1: outside
    x[3, 1, 1, 1] = -1.2  # below channel 1's minimum
    x[4, 0, 0, 0] = np.nan  # not a number: counted
    assert ranges.outside({"x": x}) == {"x": 3}
    assert ranges.outside({"x": x[:2]}) == {"x": 0}
    assert ranges.outside({"x": np.zeros((2, 5, 4, 4), np.float32)}) == {}  # another layout: not judged
    assert ranges.outside({"y": x}) == {}


def test_rounding_of_the_recorded_figures_is_not_a_drift_and_no_statistics_mean_no_check() -> None:
    ranges = CalibrationRanges.from_manifest(_stats(None, [-1.0], [1.0]))
    assert ranges is not None
    x = np.array([[1.0000004, -0.5], [0.2, 1.01]], np.float32)
    assert ranges.outside({"x": x}) == {"x": 1}
    assert CalibrationRanges.from_manifest({}) is None
    assert CalibrationRanges.from_manifest({"input_stats": {"x": {"channels": "?"}}}) is None
