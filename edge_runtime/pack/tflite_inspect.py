"""What is inside a .tflite file, read with LiteRT's own interpreter (which parses the flatbuffer
with the schema it ships): ops in execution order with their tensors, every tensor's type, shape,
shape signature and per-tensor/per-channel quantization. And the NPU profile's verdict on it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from edge_runtime.pack.targets import TargetProfile

QUANTIZED = ("int8", "uint8", "int16", "int32")  # int32: biases of quantized ops
FLOAT = ("float32", "float16", "float64")


def describe(content: bytes) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=content)
    tensors = {}
    for t in it.get_tensor_details():
        q = t["quantization_parameters"]
        tensors[int(t["index"])] = {
            "index": int(t["index"]),
            "name": t["name"],
            "dtype": np.dtype(t["dtype"]).name,
            "shape": [int(v) for v in t["shape"]],
            "shape_signature": [int(v) for v in t["shape_signature"]],
            "quantization": {
                "scales": [float(v) for v in q["scales"]],
                "zero_points": [int(v) for v in q["zero_points"]],
                "quantized_dimension": int(q["quantized_dimension"]),
            },
        }
    ops = []
    for o in it._get_ops_details():
        ops.append({
            "index": int(o["index"]), "op": str(o["op_name"]),
            "inputs": [int(i) for i in o["inputs"] if int(i) >= 0],
            "outputs": [int(i) for i in o["outputs"] if int(i) >= 0],
        })  # fmt: skip
    io = {
        "inputs": [int(d["index"]) for d in it.get_input_details()],
        "outputs": [int(d["index"]) for d in it.get_output_details()],
    }
    return {"ops": ops, "tensors": tensors, "op_histogram": dict(Counter(o["op"] for o in ops)), **io}


def npu_problems(desc: dict[str, Any], profile: TargetProfile) -> list[str]:
    """Everything that would keep this model (or part of it) off the accelerator, by op and node.
    An empty list means the whole graph is full-integer, static and made of supported ops."""
    tensors = desc["tensors"]
    problems: list[str] = []
    allowed = set(profile.allowed_ops)
    off_list: dict[str, list[str]] = {}
    in_float: dict[str, list[str]] = {}
    for op in desc["ops"]:
        where = f"{op['index']} ({', '.join(tensors[i]['name'] for i in op['outputs'])[:80]})"
        if allowed and op["op"] not in allowed:
            off_list.setdefault(op["op"], []).append(where)
        floats = sorted({tensors[i]["dtype"] for i in op["inputs"] + op["outputs"] if tensors[i]["dtype"] in FLOAT})
        if floats:
            in_float.setdefault(f"{op['op']} in {'/'.join(floats)}", []).append(where)
    for name, nodes in off_list.items():
        problems.append(f"op {name} is not supported by the accelerator ({profile.allowed_source}): "
                        f"{len(nodes)} nodes: {'; '.join(nodes[:5])}{' ...' if len(nodes) > 5 else ''}")  # fmt: skip
    for what, nodes in in_float.items():
        problems.append(f"float op {what} (the NPU takes only integer tensors): {len(nodes)} nodes: "
                        f"{'; '.join(nodes[:5])}{' ...' if len(nodes) > 5 else ''}")  # fmt: skip
    for idx in desc["inputs"] + desc["outputs"]:
        t = tensors[idx]
        if t["dtype"] not in ("int8", "uint8"):
            problems.append(f"model input/output {t['name']!r} is {t['dtype']}; the npu profile needs int8 I/O")
    for t in tensors.values():
        if any(d < 0 for d in t["shape_signature"]):
            problems.append(f"tensor {t['name']!r} has a dynamic shape {t['shape_signature']}; static shapes only")
        if profile.max_rank and len(t["shape"]) > profile.max_rank:
            problems.append(f"tensor {t['name']!r} has rank {len(t['shape'])} > {profile.max_rank}")
    return problems


def render(desc: dict[str, Any], limit: int = 400) -> str:
    """A readable listing for `edgert inspect model.tflite`."""
    t = desc["tensors"]
    lines = ["ops: " + ", ".join(f"{k} x{v}" for k, v in sorted(desc["op_histogram"].items(), key=lambda kv: -kv[1]))]
    for label in ("inputs", "outputs"):
        for i in desc[label]:
            lines.append(f"{label[:-1]}: {_tensor(t[i])}")
    lines.append("nodes:")
    for op in desc["ops"][:limit]:
        outs = ", ".join(_tensor(t[i]) for i in op["outputs"])
        lines.append(f"  {op['index']:>4} {op['op']:<24} -> {outs}")
    if len(desc["ops"]) > limit:
        lines.append(f"  ... {len(desc['ops']) - limit} more")
    return "\n".join(lines)


def _tensor(t: dict[str, Any]) -> str:
    q = t["quantization"]
    quant = ""
    if q["scales"]:
        if len(q["scales"]) == 1:
            quant = f" scale={q['scales'][0]:.6g} zp={q['zero_points'][0]}"
        else:
            quant = f" per-channel[{len(q['scales'])}] axis={q['quantized_dimension']}"
    return f"{t['name']} {t['dtype']}{t['shape_signature']}{quant}"
