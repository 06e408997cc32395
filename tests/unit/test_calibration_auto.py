"""`--calibration auto` on a model where the choice matters: one calibration sample 200x louder
than the rest blows up the global min/max, so the mean of per-sample extremes must win, and auto
must keep it (judged on calibration data, scores recorded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.pack.datasets import Sample
from edge_runtime.pack.quantize import calibration_cosine, quantize_int8
from edge_runtime.pack.targets import get_target

pytestmark = pytest.mark.unit


def _model(path: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) / 6
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) / 8
    g = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_auto_keeps_the_estimator_closer_to_fp32(tmp_path: Path) -> None:
    src = _model(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    calib = [Sample({"x": rng.standard_normal((1, 4, 16, 16)).astype(np.float32)}, f"s{i}") for i in range(24)]
    calib[3] = Sample({"x": calib[3].feeds["x"] * 200}, "loud")  # one sensor glitch among 24
    profile = get_target("x86-cpu")
    settings = quantize_int8(src, tmp_path / "q.onnx", calib, profile, "static", "auto")
    scores = settings.calibration_scores or {}
    assert set(scores) == {"mean-minmax", "minmax"}
    assert scores["mean-minmax"] > scores["minmax"] + 0.01, scores
    assert settings.calibration == "auto: mean-minmax"
    # The file written is the chosen one.
    assert calibration_cosine(src, tmp_path / "q.onnx", calib) == pytest.approx(scores["mean-minmax"], abs=1e-6)
    assert not list(tmp_path.glob("q.*.onnx"))  # the other candidate is gone
    # Asked for plainly, each estimator is used as it is.
    assert quantize_int8(src, tmp_path / "m2.onnx", calib, profile, "static", "minmax").calibration == "minmax"
