"""Exact rewrites that make float-only operators quantizable, applied to the graph an INT8
candidate is quantized from (never to the fp32 reference, which ONNX Runtime runs faster as is:
it fuses HardSigmoid and HardSwish into the preceding Conv).

    HardSigmoid(x; alpha, beta) = Clip(x * alpha + beta, 0, 1)
    HardSwish(x)                = x * Clip(x * 1/6 + 1/2, 0, 1)

For TFLite conversions (``relu6=True``) the clip is written as ReLU6 on a rescaled input,
``Relu6(x * 6 alpha + 6 beta) / 6``: onnx2tf turns Clip(0, 6) into RELU6, which the Edge TPU runs,
where Clip(0, 1) becomes RELU_0_TO_1, which it does not.

A ``Mul`` and/or ``Add`` by a constant that is one number or one per output channel, right after a
Conv whose output nothing else reads (PP-LCNetV3's learnable affine blocks, ``y = s * conv(x) + b``,
in every PP-OCRv4 model), is folded into that Conv's weights and bias:

    s * (W * x + b) + a = (s W) * x + (s b + a)

Quantized as separate ops, each is one more rounding to 8 bits of the whole feature map (and a
QLinearAdd to run); folded, the Conv's own output quantization is the only one.

ONNX Runtime has no integer HardSigmoid/HardSwish kernel, so the quantizer leaves them in float
wrapped in Dequantize/Quantize pairs (measured on the orientation model: 30 HardSigmoid nodes,
0.5 ms of float plus 1.4 ms of conversions at batch 1). Mul, Add and Clip it quantizes (Clip folds
into the Quantize range), and the rewritten graph is the same function (exact up to float rounding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.pack.graph_index import GraphIndex


def _attr(node: Any, name: str, default: float) -> float:
    return next((float(a.f) for a in node.attribute if a.name == name), default)


AFFINE = "affine op after Conv"  # the key the Conv folds are counted under


def rewrite_for_int8(src: Path, dst: Path, relu6: bool = False, hard_sigmoid: bool = True) -> dict[str, int]:
    """Write the rewritten model to ``dst``; returns {op type: nodes rewritten}. Empty: nothing to
    rewrite, and nothing is written (use ``src``). ``hard_sigmoid=False``: the Conv folds only."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    done: dict[str, int] = {}
    nodes: list[Any] = []

    def const(name: str, value: float) -> str:
        g.initializer.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    affine = _fold_conv_affine(g)
    if affine:
        done[AFFINE] = affine
    for i, n in enumerate(g.node):
        if not hard_sigmoid or n.op_type not in ("HardSigmoid", "HardSwish") or n.domain not in ("", "ai.onnx"):
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


def _channel_constant(arr: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``arr`` as one value per output channel (shape [channels]) if, broadcast against a Conv
    output of ``rank`` dimensions (N, C, ...), it is one number or varies along C only; else None."""
    if arr.dtype.kind != "f" or arr.ndim > rank:
        return None
    if arr.size == 1:
        return np.full(channels, float(arr.reshape(-1)[0]), np.float32)
    shape = (1,) * (rank - arr.ndim) + arr.shape
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return arr.reshape(channels).astype(np.float32)


def _affine_of(node: Any, x: str, inits: dict[str, Any], channels: int, rank: int) -> tuple[Any, Any] | None:
    """(k, c), one value per channel, if ``node`` computes ``k * x + c`` of its input ``x`` with
    constants: Mul, Add, Sub (x - c) and an inference BatchNormalization; else None."""
    from onnx import numpy_helper

    if node.domain not in ("", "ai.onnx") or any(i not in inits for i in node.input if i != x):
        return None
    ones, zeros = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    if node.op_type in ("Mul", "Add", "Sub") and len(node.input) == 2 and x in node.input:
        other = node.input[1] if node.input[0] == x else node.input[0]
        if other == x or (node.op_type == "Sub" and node.input[0] != x):
            return None
        c = _channel_constant(numpy_helper.to_array(inits[other]), channels, rank)
        if c is None or not np.all(np.isfinite(c)):
            return None
        return (c, zeros) if node.op_type == "Mul" else (ones, c if node.op_type == "Add" else -c)
    if node.op_type == "BatchNormalization" and node.input[0] == x and len(node.output) == 1:
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float32) for i in node.input[1:5])
        if gamma.shape != (channels,):
            return None
        eps = next((float(a.f) for a in node.attribute if a.name == "epsilon"), 1e-5)
        k = gamma / np.sqrt(var + eps)
        return (k, beta - mean * k) if np.all(np.isfinite(k)) else None
    return None


def _fold_conv_affine(g: Any) -> int:
    """Fold Mul/Add-by-constant chains after Conv into the Conv (module doc); returns how many
    Mul/Add nodes went. The Conv takes the last folded node's output name, so nothing downstream
    changes; its weights and bias become new initializers (the old ones may be shared)."""
    from onnx import numpy_helper

    ix = GraphIndex.of(g)
    inits, consumers, outputs = ix.inits, ix.consumers, ix.outputs
    drop: set[int] = set()
    folded = 0
    for index, conv in enumerate(list(g.node)):
        if conv.op_type not in ("Conv", "ConvTranspose") or conv.domain not in ("", "ai.onnx"):
            continue
        if conv.input[1] not in inits or (len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits):
            continue
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
        group = next((int(a.i) for a in conv.attribute if a.name == "group"), 1)
        transposed = conv.op_type == "ConvTranspose"
        if transposed and group != 1:
            continue
        # Conv weights are [C_out, C_in/g, k...]; ConvTranspose ones [C_in, C_out, k...] (group 1).
        channels, rank, axis = (w.shape[1], w.ndim, 1) if transposed else (w.shape[0], w.ndim, 0)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        b = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float32)
            if has_bias
            else np.zeros(channels, np.float32)
        )
        steps = 0
        while True:
            out = conv.output[0]
            after = consumers.get(out, [])
            if out in outputs or len(after) != 1:
                break
            nxt = after[0]
            scale_shift = _affine_of(nxt, out, inits, channels, rank)
            if scale_shift is None:
                break
            k, c = scale_shift
            shape = [1] * rank
            shape[axis] = channels
            w = w * k.reshape(shape)
            b = b * k + c
            conv.output[0] = nxt.output[0]
            drop.add(id(nxt))
            steps += 1
        if steps:
            base = f"{conv.name or conv.op_type}_affine{index}"
            g.initializer.append(numpy_helper.from_array(w, f"{base}_w"))
            g.initializer.append(numpy_helper.from_array(b, f"{base}_b"))
            conv.input[1] = f"{base}_w"
            if len(conv.input) > 2:
                conv.input[2] = f"{base}_b"
            else:
                conv.input.append(f"{base}_b")
            folded += steps
    if folded:
        kept = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(kept)
        used = {i for n in kept for i in n.input}
        live = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(live)
    return folded
