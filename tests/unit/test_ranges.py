"""Activation range estimators (pack/ranges.py): the least-error range per tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.pack.datasets import Sample
from edge_runtime.pack.ranges import BINS, per_tensor_ranges, quantization_mse

pytestmark = pytest.mark.unit


def test_the_error_of_a_range_weighs_clipping_against_the_step() -> None:
    edges = np.linspace(-10, 1000, BINS + 1)
    core = np.zeros(BINS)
    core[:30] = 1e6  # values between -10 and 5
    with_outlier = core.copy()
    with_outlier[-1] = 1  # one value near 1000
    # one far value among millions: clipping it costs less than a step 70x coarser for all of them
    assert quantization_mse(with_outlier, edges, -10, 5) < quantization_mse(with_outlier, edges, -10, 1000)
    spread = np.ones(BINS)  # values everywhere: clipping the top half costs more than a coarse step
    assert quantization_mse(spread, edges, -10, 1000) < quantization_mse(spread, edges, -10, 500)


def _model(path: Path) -> None:
    from onnx import TensorProto, helper, save

    t = helper.make_tensor_value_info
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [1, 262144])],
                              [t("r", TensorProto.FLOAT, [1, 262144]), t("y", TensorProto.FLOAT, [1, 262144])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def test_a_tensor_with_a_rare_outlier_gets_a_clipped_range_and_a_spread_one_its_extremes(tmp_path: Path) -> None:
    _model(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    calib = []
    for i in range(8):
        x = rng.standard_normal((1, 262144)).astype(np.float32)
        if i == 3:
            x[0, 7] = 400.0  # one value in 2 million
        calib.append(Sample(feeds={"x": x}, source=f"s{i}"))
    # Clipping a value at distance D costs D^2 / N of mean error; the step of a range D wide costs
    # (D / 255)^2 / 12 for every value: with 2 million values clipping the one outlier wins (with
    # 32,768 it would not, and the range would keep it).
    ranges, chosen = per_tensor_ranges(tmp_path / "m.onnx", calib)
    assert set(ranges) == {"x", "r", "y"} and sum(chosen.values()) == 3
    assert 3 < ranges["x"][1] < 100  # clipped well below the outlier
    assert ranges["y"][0] > -100  # y = -x: the outlier is its minimum, clipped too
    spread = [Sample(feeds={"x": rng.uniform(-1, 1, (1, 262144)).astype(np.float32)}, source="u") for _ in range(8)]
    ranges, _ = per_tensor_ranges(tmp_path / "m.onnx", spread)
    assert ranges["x"][1] > 0.99 and ranges["x"][0] < -0.99  # uniform: nothing worth clipping
    sym, _ = per_tensor_ranges(tmp_path / "m.onnx", calib, symmetric=True)
    assert all(lo == -hi for lo, hi in sym.values())


def test_per_tensor_calibration_quantizes_and_says_which_estimator_each_tensor_took(tmp_path: Path) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper, save

    from edge_runtime.pack.quantize import quantize_int8
    from edge_runtime.pack.targets import get_target

    t = helper.make_tensor_value_info
    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [t("y", TensorProto.FLOAT, [1, 8, 16, 16])], [w])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(tmp_path / "m.onnx"))
    calib = [
        Sample(feeds={"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)}, source=str(i)) for i in range(8)
    ]
    settings = quantize_int8(
        tmp_path / "m.onnx", tmp_path / "q.onnx", calib, get_target("x86-cpu"), "static", "per-tensor"
    )
    assert settings.calibration == "per-tensor"
    assert settings.estimators and sum(settings.estimators.values()) == 3  # x, c, y
    feeds = calib[0].feeds
    ref = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, feeds)[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, feeds)[0]
    assert float(np.dot(ref.ravel(), got.ravel()) / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99
