"""Bias correction of a quantized graph (pack/bias_correction.py): the mean error per output
channel that quantization adds is measured on calibration data and taken out of each layer's
bias, layer after layer, including layers whose Relu the quantizer folded away."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.pack.bias_correction import correct_biases

pytestmark = pytest.mark.unit


def _model(path: Path) -> None:
    """x -> Conv 3x3 (16) -> Relu -> Conv 3x3 (16) -> Relu -> Conv 1x1 (8) -> y, with weights whose
    8-bit rounding shifts the channel means (a few large weights set the per-channel scale)."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)

    def w(shape: tuple[int, ...]) -> np.ndarray:
        a = rng.standard_normal(shape).astype(np.float32) * 0.05
        a.reshape(shape[0], -1)[:, 0] = 2.0  # one large weight per output channel: a coarse step
        return a

    inits = [numpy_helper.from_array(w((16, 3, 3, 3)), "w1"), numpy_helper.from_array(np.full(16, -1.0, np.float32), "b1"),
             numpy_helper.from_array(w((16, 16, 3, 3)), "w2"), numpy_helper.from_array(np.full(16, -0.5, np.float32), "b2"),
             numpy_helper.from_array(w((8, 16, 1, 1)), "w3"), numpy_helper.from_array(np.zeros(8, np.float32), "b3")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["y"])]  # fmt: skip
    t = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [t("y", TensorProto.FLOAT, [1, 8, 16, 16])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.uniform(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def _channel_error(fp32: Path, q: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    import onnxruntime as ort

    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])
    err = np.mean([(b.run(None, f)[0] - a.run(None, f)[0]).mean(axis=(0, 2, 3)) for f in feeds], axis=0)
    return float(np.abs(err).mean())


def test_layer_biases_take_out_the_mean_error_and_relu_folds_are_compared_before_the_relu(tmp_path: Path) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    _model(tmp_path / "m.onnx")
    calib = _feeds(16, 1)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calib)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)  # fmt: skip
    # the quantizer folded both Relus (the first two Convs carry the Relus' output names) and renamed the last
    q_outputs = [n.output[0] for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "Conv"]
    assert q_outputs[:2] == ["r1", "r2"] and q_outputs[2] != "y"  # y: the Dequantize after the last Conv
    assert correct_biases(tmp_path / "m.onnx", tmp_path / "q.onnx", calib, tmp_path / "bc.onnx") == 3
    held_out = _feeds(16, 2)  # judged on other samples than it was measured on
    before = _channel_error(tmp_path / "m.onnx", tmp_path / "q.onnx", held_out)
    after = _channel_error(tmp_path / "m.onnx", tmp_path / "bc.onnx", held_out)
    # about 10x smaller here; correcting every layer at once (each also undoing what its predecessors
    # already corrected) only halves it, and comparing after the folded Relus makes it 10x worse
    assert after < 0.2 * before, (before, after)
    # only the int32 biases changed
    q, bc = onnx.load(str(tmp_path / "q.onnx")), onnx.load(str(tmp_path / "bc.onnx"))
    changed = [a.name for a, b in zip(q.graph.initializer, bc.graph.initializer, strict=True) if a != b]
    assert changed and all(a.data_type == onnx.TensorProto.INT32 for a in q.graph.initializer if a.name in changed)


def test_a_correction_is_judged_on_calibration_samples_it_was_not_measured_on() -> None:
    """A correction measured on some samples always looks better on those samples (PP-OCR cls on
    x86-vnni: calibration cosine up, held-out cosine 0.991 -> 0.979), so the keep-or-drop choice
    is made on samples set aside, whenever there are enough to spare."""
    from edge_runtime.pack.onnx_pack import BIAS_SAMPLES, bias_split

    for n, measured, judged in ((48, 32, 16), (32, 22, 10), (64, BIAS_SAMPLES, 21)):
        calib = list(range(n))
        m, j = bias_split(calib)
        assert (len(m), len(j)) == (measured, judged)
        assert not set(m) & set(j)
    few = list(range(12))  # too few to set any aside: judged on the samples measured
    m, j = bias_split(few)
    assert m == j == few
