"""Exact rewrites of float-only ops (pack/rewrites.py) and how the packer names what costs time
(pack/op_costs.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.pack.op_costs import family, float_ops, responsible
from edge_runtime.pack.rewrites import rewrite_for_int8

pytestmark = pytest.mark.unit


def _model(path: Path) -> None:
    from onnx import TensorProto, helper, save

    t = helper.make_tensor_value_info
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], alpha=0.2, beta=0.5),
             helper.make_node("HardSwish", ["h"], ["y"])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [2, 64])], [t("y", TensorProto.FLOAT, [2, 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def test_hardsigmoid_and_hardswish_become_mul_add_clip_with_the_same_answers(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    _model(tmp_path / "m.onnx")
    done = rewrite_for_int8(tmp_path / "m.onnx", tmp_path / "r.onnx")
    assert done == {"HardSigmoid": 1, "HardSwish": 1}
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r.onnx")).graph.node]
    assert "HardSigmoid" not in ops and "HardSwish" not in ops and ops.count("Clip") == 2
    x = {"x": np.linspace(-8, 8, 128, dtype=np.float32).reshape(2, 64)}
    a = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, x)[0]
    b = ort.InferenceSession(str(tmp_path / "r.onnx")).run(None, x)[0]
    assert np.abs(a - b).max() < 1e-6


def test_cost_is_compared_by_op_family_and_float_ops_are_named() -> None:
    assert [family(o) for o in ("QLinearConv", "QGemm", "MatMulInteger", "QuantizeLinear", "Mul")] == [
        "Conv", "Gemm", "MatMul", "QuantizeLinear", "Mul"]  # fmt: skip
    ref = {"Conv": {"ms": 3.4, "nodes": 32}, "Mul": {"ms": 0.05, "nodes": 3}}
    cand = {"QLinearConv": {"ms": 2.2, "nodes": 32}, "QLinearMul": {"ms": 1.9, "nodes": 61},
            "HardSigmoid": {"ms": 0.5, "nodes": 30}, "QuantizeLinear": {"ms": 0.9, "nodes": 31}}  # fmt: skip
    why = responsible(ref, cand)
    assert why[0].startswith("Mul x61 +1.85 ms (QLinearMul: integer")
    assert not any(w.startswith("Conv") for w in why)  # faster in INT8: not blamed
    assert "HardSigmoid x30 +0.50 ms (HardSigmoid: float" in " ".join(why)
    assert list(float_ops(cand)) == ["HardSigmoid"]


def _swish_model(path: Path, alpha: float, sixth_out: bool = False) -> None:
    """x -> Conv 1x1 -> h; y = h * Clip(h * alpha + 0.5, 0, 1) (the rewritten hard-swish), and with
    ``sixth_out`` also a Mul by 1/6 whose output is a graph output (never folded)."""
    from onnx import TensorProto, helper, numpy_helper, save

    t = helper.make_tensor_value_info
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(alpha, np.float32), "alpha"),
             numpy_helper.from_array(np.array(0.5, np.float32), "beta"),
             numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
             numpy_helper.from_array(np.array(1.0, np.float32), "hi"),
             numpy_helper.from_array(np.array(1 / 6, np.float32), "sixth")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]),
             helper.make_node("Mul", ["h", "alpha"], ["ha"]),
             helper.make_node("Add", ["ha", "beta"], ["hab"]),
             helper.make_node("Clip", ["hab", "lo", "hi"], ["hs"]),
             helper.make_node("Mul", ["h", "hs"], ["y"])]  # fmt: skip
    outs = [t("y", TensorProto.FLOAT, [1, 8, 6, 6])]
    if sixth_out:
        nodes.append(helper.make_node("Mul", ["y", "sixth"], ["y6"]))
        outs.append(t("y6", TensorProto.FLOAT, [1, 8, 6, 6]))
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [1, 4, 6, 6])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(1)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": (rng.standard_normal((1, 4, 6, 6)) * 2).astype(np.float32)} for _ in range(8)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ)


def test_a_mul_by_a_positive_constant_between_quantize_nodes_becomes_a_scale(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from edge_runtime.pack.qdq_folds import fold_scalar_muls

    _swish_model(tmp_path / "m.onnx", alpha=0.25, sixth_out=True)
    _quantize(tmp_path / "m.onnx", tmp_path / "q.onnx")
    (tmp_path / "f.onnx").write_bytes((tmp_path / "q.onnx").read_bytes())
    assert fold_scalar_muls(tmp_path / "f.onnx") == 1  # * alpha; not h * hs, not the Mul feeding an output
    before = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    after = [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node]
    assert after.count("Mul") == before.count("Mul") - 1 == 2
    assert after.count("QuantizeLinear") == before.count("QuantizeLinear") - 1
    x = {"x": (np.random.default_rng(2).standard_normal((1, 4, 6, 6)) * 2).astype(np.float32)}
    ref = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, x)
    q = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, x)
    f = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, x)
    step = float(np.abs(ref[0]).max()) / 127
    # the same function: the folded graph is as close to fp32 as the unfolded one (one rounding fewer)
    assert np.abs(f[0] - ref[0]).max() <= np.abs(q[0] - ref[0]).max() + step


def test_a_mul_by_a_negative_constant_is_not_folded(tmp_path: Path) -> None:
    from edge_runtime.pack.qdq_folds import fold_scalar_muls

    _swish_model(tmp_path / "m.onnx", alpha=-0.25)
    _quantize(tmp_path / "m.onnx", tmp_path / "q.onnx")
    assert fold_scalar_muls(tmp_path / "q.onnx") == 0  # the scale would turn negative
