"""Bias correction of a quantized (QDQ) graph: each convolution's mean output error against fp32,
per output channel, is measured on the calibration samples and taken out of its bias.

Quantizing weights and inputs shifts the mean of a layer's output (rounding is not zero-mean once
a clip or an asymmetric range is involved, and every layer inherits the shifts of those before
it). The shift is cheap to measure and exact to remove: the bias is an int32 tensor under the scale
``s_input * s_weight``, and subtracting ``round(error / scale)`` moves the output by the error to
within half a step. This is the correction NNCF applies ("bias correction"), done here in order
from the input side: a layer is measured only once every layer upstream of it is corrected, so it
never corrects an error its predecessors already took out.

The layer's float output is compared before any activation: the quantizer folds a Relu or Clip
after a convolution into the Quantize's range and gives the convolution the activation's output
name, so for those the fp32 tensor compared is the activation's input. Only layers found that way,
with an int32 bias behind a Dequantize, are corrected; the rest are left as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.pack.graph_index import GraphIndex, exposing
from edge_runtime.pack.validate import session

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm")


def _session(model: Any) -> Any:
    return session(model.SerializeToString(), threads=0)  # 0: ONNX Runtime's default, every core


def _with_outputs(model: Any, names: list[str], bias_inputs: Sequence[Any] = ()) -> Any:
    """A copy of ``model`` that also outputs ``names`` and takes the given initializers as inputs
    (their values are then fed at each run: one session serves every correction step)."""
    from onnx import TensorProto, helper

    m = exposing(model, names)
    fed = {b.name for b in bias_inputs}
    keep = [i for i in m.graph.initializer if i.name not in fed]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    m.graph.input.extend(helper.make_tensor_value_info(b.name, TensorProto.INT32, list(b.dims)) for b in bias_inputs)
    return m


def _channel_means(x: np.ndarray, op: str) -> np.ndarray:
    axis = x.ndim - 1 if op == "Gemm" else 1
    return x.astype(np.float64).mean(axis=tuple(i for i in range(x.ndim) if i != axis))


def correct_biases(fp32: Path, quantized: Path, feeds: list[dict[str, np.ndarray]], out: Path) -> int:
    """Write the bias-corrected ``quantized`` model to ``out``; returns how many layers were corrected
    (0: nothing to correct, and ``out`` is a copy).

    The fp32 per-channel means of every layer are measured once. The quantized layers are then
    corrected frontier by frontier: each step corrects every layer none of whose upstream layers is
    still uncorrected (for a plain chain, one layer a step), measured with all earlier corrections
    in place. One session serves every step, its biases fed as inputs."""
    import onnx
    from onnx import numpy_helper

    ref = onnx.load(str(fp32))
    model = onnx.load(str(quantized))
    g = model.graph
    ix = GraphIndex.of(g)
    inits, producer, consumers = ix.inits, ix.producer, ix.consumers
    ref_producer = GraphIndex.of(ref.graph).producer

    def ref_name(node: Any) -> str | None:
        """The fp32 tensor that is this layer's output before any activation."""
        name = node.output[0]
        if name not in ref_producer:  # a graph output: the quantizer renamed the layer's output and
            q = consumers.get(name, [])  # gave the graph output's name to the Dequantize after it
            dq = consumers.get(q[0].output[0], []) if len(q) == 1 and q[0].op_type == "QuantizeLinear" else []
            name = dq[0].output[0] if len(dq) == 1 and dq[0].op_type == "DequantizeLinear" else name
        p = ref_producer.get(name)
        if p is not None and p.op_type in ("Relu", "Clip"):  # folded into the Quantize's range
            p = ref_producer.get(p.input[0])
        return p.output[0] if p is not None and p.op_type == node.op_type else None

    layers: list[tuple[Any, str, Any, np.ndarray]] = []  # (node, fp32 tensor, bias initializer, bias scale)
    for n in g.node:
        if n.op_type not in LAYER_OPS or len(n.input) < 3:
            continue
        ref_out = ref_name(n)
        dq = producer.get(n.input[2])
        if ref_out is None or dq is None or dq.op_type != "DequantizeLinear":
            continue
        if dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        if numpy_helper.to_array(inits[dq.input[0]]).dtype != np.int32:
            continue
        layers.append((n, ref_out, inits[dq.input[0]], numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)))
    if not layers or not feeds:
        onnx.save(model, str(out))
        return 0

    # Which layers lie upstream of which (through any path of the quantized graph).
    index = {id(n): i for i, (n, _, _, _) in enumerate(layers)}
    upstream: dict[int, set[int]] = {}  # node id -> indices of layers upstream of it (itself excluded)
    for n in g.node:  # the graph is in topological order
        ups: set[int] = set()
        for name in n.input:
            p = producer.get(name)
            if p is not None:
                ups |= upstream.get(id(p), set())
                if id(p) in index:
                    ups.add(index[id(p)])
        upstream[id(n)] = ups

    ref_s = _session(_with_outputs(ref, [r for _, r, _, _ in layers]))
    ref_names = [r for _, r, _, _ in layers]
    want = [np.zeros(1)] * len(layers)
    for f in feeds:
        for i, a in enumerate(ref_s.run(ref_names, f)):
            want[i] = want[i] + _channel_means(a, layers[i][0].op_type) / len(feeds)
    del ref_s

    biases = [b for _, _, b, _ in layers]
    cand_s = _session(_with_outputs(model, [n.output[0] for n, _, _, _ in layers], biases))
    values = {b.name: numpy_helper.to_array(b) for b in biases}
    done: set[int] = set()
    corrected = 0
    while len(done) < len(layers):
        frontier = [i for i in range(len(layers)) if i not in done and upstream[id(layers[i][0])] <= done]
        names = [layers[i][0].output[0] for i in frontier]
        got = [np.zeros(1)] * len(frontier)
        for f in feeds:
            for k, b in enumerate(cand_s.run(names, {**f, **values})):
                got[k] = got[k] + _channel_means(b, layers[frontier[k]][0].op_type) / len(feeds)
        for k, i in enumerate(frontier):
            done.add(i)
            _, _, bias_init, scale = layers[i]
            err = got[k] - want[i]
            bias = values[bias_init.name]
            if err.shape != bias.shape or not np.isfinite(err).all():
                continue
            info = np.iinfo(np.int32)
            new = bias.astype(np.int64) - np.round(err / scale).astype(np.int64)
            values[bias_init.name] = np.clip(new, info.min, info.max).astype(np.int32)
            corrected += 1
    for b in biases:
        b.CopyFrom(numpy_helper.from_array(values[b.name], b.name))
    onnx.save(model, str(out))
    return corrected
