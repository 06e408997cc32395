"""Where a model's time goes, per operator type, from ONNX Runtime's own profiler.

The packer uses it to say why an INT8 candidate is slower than fp32 (which ops stayed float,
how much the Quantize/Dequantize pairs around them cost) and which ops of a candidate run in
float at all. Times are per call at batch 1 on one thread, on the kernels ONNX Runtime chose
after its graph optimizations (so ``QLinearConv`` rather than DequantizeLinear/Conv/QuantizeLinear).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edge_runtime.pack.datasets import Sample

# Kernels that compute in integers, and the conversions at the edges of integer regions.
INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
               "QLinearAveragePool", "QLinearSoftmax", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
               "QLinearReduceMean", "QGemm", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QAttention", "NhwcMaxPool", "MaxPool"}  # fmt: skip
CONVERSIONS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
# Ops that move or reshape data and compute nothing worth naming.
LAYOUT_OPS = {"Shape", "Slice", "Concat", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Flatten",
              "ReorderInput", "ReorderOutput", "Identity", "Cast", "Constant", "Expand"}  # fmt: skip


def op_times(model: Path | bytes, sample: Sample, runs: int = 20) -> dict[str, dict[str, float]]:
    """{op type: {"ms": mean ms per call of all its nodes, "nodes": count}} at batch 1, one thread."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgert-prof-") as d:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(d, "p")
        sess = ort.InferenceSession(str(model) if isinstance(model, Path) else model, opts,
                                    providers=["CPUExecutionProvider"])  # fmt: skip
        for _ in range(3 + runs):
            sess.run(None, sample.feeds)
        events: list[dict[str, Any]] = json.loads(Path(sess.end_profiling()).read_text())
    total: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    calls = 3 + runs
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            op = str(e["args"]["op_name"])
            total[op] = total.get(op, 0.0) + float(e["dur"])
            nodes.setdefault(op, set()).add(str(e["name"]))
    ranked = sorted(total, key=lambda k: -total[k])
    return {op: {"ms": total[op] / calls / 1000, "nodes": len(nodes[op])} for op in ranked}


def float_ops(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The ops of a quantized candidate that still compute in float (everything that is not an
    integer kernel, a conversion or pure data movement), with their cost."""
    return {op: t for op, t in times.items() if op not in INTEGER_OPS | CONVERSIONS | LAYOUT_OPS}


def family(op: str) -> str:
    """The float op an integer kernel stands for (QLinearConv -> Conv, QGemm -> Gemm, ...)."""
    for prefix in ("QLinear", "Q"):
        if op.startswith(prefix) and op not in CONVERSIONS and op[len(prefix) :][:1].isupper():
            return op[len(prefix) :]
    return op.removesuffix("Integer")


def responsible(reference: dict[str, dict[str, float]], candidate: dict[str, dict[str, float]],
                top: int = 4) -> list[str]:  # fmt: skip
    """What the candidate spends more time on than the reference, largest first, as readable lines.
    Ops are compared by family (the candidate's QLinearMul against the reference's Mul); the
    reference may have fused an op into another (ONNX Runtime folds HardSigmoid/HardSwish and Mul
    into Conv in fp32), so a family the reference hardly runs counts nearly whole."""
    ref: dict[str, float] = {}
    for op, t in reference.items():
        ref[family(op)] = ref.get(family(op), 0.0) + t["ms"]
    cand: dict[str, tuple[float, int, list[str]]] = {}
    for op, t in candidate.items():
        ms, n, names = cand.get(family(op), (0.0, 0, []))
        cand[family(op)] = (ms + t["ms"], n + int(t["nodes"]), [*names, op])
    floats = float_ops(candidate)
    extra = sorted(((f, c[0] - ref.get(f, 0.0)) for f, c in cand.items()), key=lambda kv: -kv[1])
    out = []
    for f, ms in extra[:top]:
        if ms <= 0.005:
            break
        _, n, names = cand[f]
        kinds = sorted({"float" if o in floats else "conversion" if o in CONVERSIONS
                        else "integer" if o in INTEGER_OPS else "other" for o in names})  # fmt: skip
        out.append(f"{f} x{n} +{ms:.2f} ms ({'/'.join(names)}: {', '.join(kinds)}; fp32 {ref.get(f, 0.0):.2f} ms)")
    return out
