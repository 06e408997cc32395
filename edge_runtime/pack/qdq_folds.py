"""Folds applied to a quantized (QDQ) graph: integer work that is only a change of scale is
removed, and the scale changes instead.

A tensor quantized as ``q`` with scale ``s`` and zero point ``z`` stands for ``s * (q - z)``;
multiplied by a positive constant ``c`` it stands for ``(s * c) * (q - z)``: the same integers under
the scale ``s * c``. So a ``Mul`` by a positive scalar constant (or a ``Div`` by one), between a Dequantize of its input
and a Quantize of its output, is replaced by a Dequantize of the *input's* integers with the
scale multiplied by ``c``; the Mul, its Quantize and the Dequantize after it go. The result is
closer to the float graph than before (one rounding fewer), and ONNX Runtime fuses what follows
as it did.

Where it pays: the hard-sigmoid rewrite (``rewrites.py``) writes ``Clip(x * alpha + beta, 0, 1)``,
and ONNX Runtime runs the ``* alpha`` as a QLinearMul over the whole feature map. After the fold
the scale carries ``alpha`` and the ``+ beta`` with the clip is a single QLinearAdd. On the zoo's
orientation model that removes 30 of its 61 QLinearMul nodes. PP-OCR's DBNet writes HardSwish as
``x * Clip(x + 3, 0, 6) / 6``: the ``/ 6`` is such a Div (24 of them), a requantization each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.pack.graph_index import GraphIndex


def fold_scalar_muls(path: Path) -> int:
    """Fold every foldable Mul of the QDQ model at ``path`` in place; returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    ix = GraphIndex.of(g)
    inits, producer, consumers, outputs = ix.inits, ix.producer, ix.consumers, ix.outputs

    def scalar(name: str) -> float | None:
        """The value of a one-element constant, given as an initializer or as a Dequantize of one."""
        if name in inits:
            arr = numpy_helper.to_array(inits[name])
            return float(arr.reshape(-1)[0]) if arr.size == 1 and arr.dtype.kind == "f" else None
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            return None
        if any(i not in inits for i in dq.input[1:]):
            return None
        q = numpy_helper.to_array(inits[dq.input[0]])
        s = float(numpy_helper.to_array(inits[dq.input[1]]).reshape(-1)[0])
        z = float(numpy_helper.to_array(inits[dq.input[2]]).reshape(-1)[0]) if len(dq.input) > 2 else 0.0
        return (float(q.reshape(-1)[0]) - z) * s if q.size == 1 else None

    drop: set[int] = set()
    replace: dict[int, Any] = {}  # index of a Mul -> the Dequantize that takes its place
    folded = 0
    for idx, mul in enumerate(g.node):
        if mul.op_type not in ("Mul", "Div") or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
            continue
        c, a = scalar(mul.input[1]), mul.input[0]
        if mul.op_type == "Div":  # x / c is x * (1 / c); a constant dividend is not a scale
            c = 1 / c if c else None
        elif c is None:
            c, a = scalar(mul.input[0]), mul.input[1]
        dq_a = producer.get(a)
        if c is None or not (c > 0 and np.isfinite(c)) or dq_a is None or dq_a.op_type != "DequantizeLinear":
            continue
        if dq_a.input[1] not in inits:
            continue
        after = consumers.get(mul.output[0], [])
        if mul.output[0] in outputs or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        q_m = after[0]
        dqs = consumers.get(q_m.output[0], [])
        if q_m.output[0] in outputs or not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        if any(d.output[0] in outputs for d in dqs):
            continue
        scale = numpy_helper.to_array(inits[dq_a.input[1]])
        new_scale = f"{dq_a.input[1]}_x{folded}"
        g.initializer.append(numpy_helper.from_array((scale * c).astype(scale.dtype), new_scale))
        new_out = f"{mul.output[0]}_folded"
        attrs = {a.name: helper.get_attribute_value(a) for a in dq_a.attribute}
        inputs = [dq_a.input[0], new_scale, *dq_a.input[2:]]
        replace[idx] = helper.make_node("DequantizeLinear", inputs, [new_out], name=f"{mul.name}_folded", **attrs)
        for d in dqs:
            for user in consumers.get(d.output[0], []):
                for j, name in enumerate(user.input):
                    if name == d.output[0]:
                        user.input[j] = new_out
            drop.add(id(d))
        drop.add(id(q_m))
        folded += 1
    if not folded:
        return 0
    nodes = [replace.get(i, n) for i, n in enumerate(g.node) if id(n) not in drop]
    # Dequantize nodes of constants that nothing reads any more, and their initializers.
    while True:
        used = {i for n in nodes for i in n.input} | outputs
        dead = {id(n) for n in nodes if n.op_type == "DequantizeLinear" and n.output[0] not in used}
        if not dead:
            break
        nodes = [n for n in nodes if id(n) not in dead]
    used = {i for n in nodes for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.save(model, str(path))
    return folded
