"""Exact rewrites of float-only ops (pack/rewrites.py) and how the packer names what costs time
(pack/op_costs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def _affine_model(path: Path) -> None:
    """Conv -> Mul (one per channel) -> Add (one number) -> BatchNormalization -> Relu, beside
    ConvTranspose -> Add (bias as [C, 1, 1]) -> Sub; and what must stay: a Conv whose output two
    nodes read (one of them a foldable Mul), ``c - x`` (not ``k x + c``), and a Mul by a constant
    that varies over space."""
    from onnx import TensorProto, helper, numpy_helper, save

    t = helper.make_tensor_value_info
    rng = np.random.default_rng(3)

    def c(name: str, *shape: int) -> Any:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [c("w", 8, 4, 3, 3), c("b", 8), c("m", 1, 8, 1, 1), c("a"), c("g", 8), c("be", 8), c("mu", 8),
             numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "var"),
             c("wt", 4, 6, 2, 2), c("bt", 6, 1, 1), c("s", 1, 6, 1, 1), c("w2", 5, 4, 1, 1), c("m2", 1, 5, 1, 1),
             c("sp", 1, 5, 6, 6), c("w3", 5, 4, 1, 1), c("k")]  # fmt: skip
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c1", "m"], ["c1m"]),
             helper.make_node("Add", ["a", "c1m"], ["c1a"]),
             helper.make_node("BatchNormalization", ["c1a", "g", "be", "mu", "var"], ["c1n"], epsilon=1e-3),
             helper.make_node("Relu", ["c1n"], ["y1"]),
             helper.make_node("ConvTranspose", ["x", "wt"], ["t1"], strides=[2, 2]),
             helper.make_node("Add", ["t1", "bt"], ["t1b"]),
             helper.make_node("Sub", ["t1b", "s"], ["y2"]),
             helper.make_node("Conv", ["x", "w2"], ["c2"]),
             helper.make_node("Mul", ["c2", "m2"], ["y3"]),
             helper.make_node("Relu", ["c2"], ["y4"]),
             helper.make_node("Conv", ["x", "w3"], ["c3"]),
             helper.make_node("Sub", ["k", "c3"], ["y5"]),
             helper.make_node("Conv", ["x", "w3"], ["c4"]),
             helper.make_node("Mul", ["c4", "sp"], ["y6"])]  # fmt: skip
    outs = [t("y1", TensorProto.FLOAT, [1, 8, 6, 6]), t("y2", TensorProto.FLOAT, [1, 6, 12, 12]),
            t("y3", TensorProto.FLOAT, [1, 5, 6, 6]), t("y4", TensorProto.FLOAT, [1, 5, 6, 6]),
            t("y5", TensorProto.FLOAT, [1, 5, 6, 6]), t("y6", TensorProto.FLOAT, [1, 5, 6, 6])]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [1, 4, 6, 6])], outs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(path))


def test_affine_ops_after_a_conv_fold_into_its_weights_and_bias(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from edge_runtime.pack.rewrites import AFFINE

    _affine_model(tmp_path / "m.onnx")
    done = rewrite_for_int8(tmp_path / "m.onnx", tmp_path / "r.onnx")
    assert done == {AFFINE: 5}  # Mul, Add, BatchNormalization; Add, Sub
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r.onnx")).graph.node]
    assert sorted(ops) == ["Conv"] * 4 + ["ConvTranspose", "Mul", "Mul", "Relu", "Relu", "Sub"]
    x = {"x": np.random.default_rng(4).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    a = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, x)
    b = ort.InferenceSession(str(tmp_path / "r.onnx")).run(None, x)
    for ya, yb in zip(a, b, strict=True):
        assert np.abs(ya - yb).max() < 1e-4 * max(1.0, float(np.abs(ya).max()))
    assert rewrite_for_int8(tmp_path / "m.onnx", tmp_path / "f.onnx", hard_sigmoid=False) == {AFFINE: 5}


def test_a_div_by_a_positive_constant_folds_like_a_mul(tmp_path: Path) -> None:
    """y = h * Clip(h + 3, 0, 6) / 6, DBNet's hard-swish: the / 6 becomes the scale of the Mul's
    integers; a constant divided by a tensor is not a scale and stays."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper, save

    from edge_runtime.pack.qdq_folds import fold_scalar_muls

    t = helper.make_tensor_value_info
    w = np.random.default_rng(5).standard_normal((8, 4, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w")] + [
        numpy_helper.from_array(np.array(v, np.float32), n)
        for n, v in (("three", 3), ("lo", 0), ("six", 6), ("ten", 10))
    ]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "three"], ["h3"]),
             helper.make_node("Clip", ["h3", "lo", "six"], ["hc"]), helper.make_node("Mul", ["h", "hc"], ["hm"]),
             helper.make_node("Div", ["hm", "six"], ["hs"]), helper.make_node("Add", ["hs", "ten"], ["den"]),
             helper.make_node("Div", ["six", "den"], ["inv"]),
             helper.make_node("Conv", ["inv", "w2"], ["y"])]  # fmt: skip
    inits.append(
        numpy_helper.from_array(np.random.default_rng(6).standard_normal((2, 8, 1, 1)).astype(np.float32), "w2")
    )
    graph = helper.make_graph(nodes, "g", [t("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                              [t("y", TensorProto.FLOAT, [1, 2, 6, 6])], inits)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(tmp_path / "m.onnx"))
    _quantize(tmp_path / "m.onnx", tmp_path / "q.onnx")
    (tmp_path / "f.onnx").write_bytes((tmp_path / "q.onnx").read_bytes())
    assert fold_scalar_muls(tmp_path / "f.onnx") == 1
    ops = [n.op_type for n in onnx.load(str(tmp_path / "f.onnx")).graph.node]
    assert ops.count("Div") == 1  # six / den stays
    x = {"x": (np.random.default_rng(2).standard_normal((1, 4, 6, 6)) * 2).astype(np.float32)}
    ref = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, x)[0]
    q = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, x)[0]
    f = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, x)[0]
    # the same function: as close to fp32 as the unfolded graph, to within rounding steps
    step = float(np.abs(ref).max()) / 127
    assert np.abs(f - ref).max() <= np.abs(q - ref).max() + 2 * step
