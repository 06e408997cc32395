"""Exact rewrites that make float-only operators quantizable, applied to the graph an INT8
candidate is quantized from (never to the fp32 reference, which ONNX Runtime runs faster as is:
it fuses HardSigmoid and HardSwish into the preceding Conv).

    HardSigmoid(x; alpha, beta) = Clip(x * alpha + beta, 0, 1)
    HardSwish(x)                = x * Clip(x * 1/6 + 1/2, 0, 1)

For TFLite conversions (``relu6=True``) the clip is written as ReLU6 on a rescaled input,
``Relu6(x * 6 alpha + 6 beta) / 6``: onnx2tf turns Clip(0, 6) into RELU6, which the Edge TPU runs,
where Clip(0, 1) becomes RELU_0_TO_1, which it does not.

ONNX Runtime has no integer HardSigmoid/HardSwish kernel, so the quantizer leaves them in float
wrapped in Dequantize/Quantize pairs (measured on the orientation model: 30 HardSigmoid nodes,
0.5 ms of float plus 1.4 ms of conversions at batch 1). Mul, Add and Clip it quantizes (Clip folds
into the Quantize range), and the rewritten graph is the same function (exact up to float rounding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _attr(node: Any, name: str, default: float) -> float:
    return next((float(a.f) for a in node.attribute if a.name == name), default)


def rewrite_for_int8(src: Path, dst: Path, relu6: bool = False) -> dict[str, int]:
    """Write the rewritten model to ``dst``; returns {op type: nodes rewritten}. Empty: nothing to
    rewrite, and nothing is written (use ``src``)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    done: dict[str, int] = {}
    nodes: list[Any] = []

    def const(name: str, value: float) -> str:
        g.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    for i, n in enumerate(g.node):
        if n.op_type not in ("HardSigmoid", "HardSwish") or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        base = f"{n.name or n.op_type}_rw{i}"
        alpha, beta = (_attr(n, "alpha", 0.2), _attr(n, "beta", 0.5)) if n.op_type == "HardSigmoid" else (1 / 6, 0.5)
        hs = n.output[0] if n.op_type == "HardSigmoid" else f"{base}_hs"
        k = 6.0 if relu6 else 1.0
        clipped = f"{base}_c" if relu6 else hs
        nodes += [
            helper.make_node(
                "Mul", [n.input[0], const(f"{base}_alpha", alpha * k)], [f"{base}_ax"], name=f"{base}_mul"
            ),
            helper.make_node(
                "Add", [f"{base}_ax", const(f"{base}_beta", beta * k)], [f"{base}_axb"], name=f"{base}_add"
            ),
            helper.make_node(
                "Clip",
                [f"{base}_axb", const(f"{base}_lo", 0.0), const(f"{base}_hi", k)],
                [clipped],
                name=f"{base}_clip",
            ),
        ]
        if relu6:
            nodes.append(helper.make_node("Mul", [clipped, const(f"{base}_sixth", 1 / 6)], [hs], name=f"{base}_div6"))
        if n.op_type == "HardSwish":
            nodes.append(helper.make_node("Mul", [n.input[0], hs], [n.output[0]], name=f"{base}_swish"))
        done[n.op_type] = done.get(n.op_type, 0) + 1
    if done:
        del g.node[:]
        g.node.extend(nodes)
        onnx.save(model, str(dst))
    return done
