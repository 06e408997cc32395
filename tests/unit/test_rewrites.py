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
