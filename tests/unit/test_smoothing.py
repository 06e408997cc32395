"""Activation smoothing (pack/smoothing.py): the same float function, a flatter activation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.pack.datasets import Sample
from edge_runtime.pack.smoothing import smooth_activations

pytestmark = pytest.mark.unit


def _model(path: Path, depthwise: bool = False, shared: bool = False) -> None:
    """x -> Conv(3->8) -> Relu -> Conv(8->4 or depthwise 8->8); channel 0 of the middle tensor is
    50x wider than the others (an outlier channel). ``shared``: the middle tensor is also an output."""
    from onnx import TensorProto, helper, numpy_helper, save

    t = helper.make_tensor_value_info
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w1[0] *= 50
    w2 = rng.standard_normal((8, 1, 3, 3) if depthwise else (4, 8, 3, 3)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], group=8 if depthwise else 1)]  # fmt: skip
    outs = [t("y", TensorProto.FLOAT, [1, 8 if depthwise else 4, 8, 8])]
    if shared:
        outs.append(t("r", TensorProto.FLOAT, [1, 8, 8, 8]))
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [1, 3, 8, 8])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def _calib() -> list[Sample]:
    rng = np.random.default_rng(1)
    return [Sample(feeds={"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)}, source=str(i)) for i in range(8)]


def _run(path: Path, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    m = onnx.load(str(path))
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have)
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)


@pytest.mark.parametrize("depthwise", [False, True])
def test_the_function_stays_and_the_outlier_channel_narrows(tmp_path: Path, depthwise: bool) -> None:
    _model(tmp_path / "m.onnx", depthwise)
    calib = _calib()
    assert smooth_activations(tmp_path / "m.onnx", tmp_path / "s.onnx", calib, 0.5) == 1
    feeds = calib[0].feeds
    (y0, r0), (y1, r1) = _run(tmp_path / "m.onnx", ["y", "r"], feeds), _run(tmp_path / "s.onnx", ["y", "r"], feeds)
    assert np.abs(y1 - y0).max() <= 1e-4 * np.abs(y0).max()  # the same function
    spread = lambda r: float(np.abs(r).max(axis=(0, 2, 3)).max() / np.abs(r).max(axis=(0, 2, 3)).min())  # noqa: E731
    assert spread(r1) < spread(r0) / 3  # the outlier channel's range went into the weights


def test_a_tensor_read_elsewhere_is_not_touched_and_alpha_is_checked(tmp_path: Path) -> None:
    _model(tmp_path / "m.onnx", shared=True)
    assert smooth_activations(tmp_path / "m.onnx", tmp_path / "s.onnx", _calib(), 0.5) == 0
    assert not (tmp_path / "s.onnx").exists()
    with pytest.raises(ValueError, match="between 0 and 1"):
        smooth_activations(tmp_path / "m.onnx", tmp_path / "s.onnx", _calib(), 1.5)
