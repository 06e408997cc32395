"""Prepare an ONNX model for quantization.

Each step answers a trap seen on real exports (../shared/MODELS.md):
- the ONNX checker first, so a broken file is named as such, not as a quantizer crash;
- refuse graphs ONNX Runtime has already fused (com.microsoft ops): quantizing them gave
  models that would not load;
- opset below 13 is upgraded, or per-channel DequantizeLinear (axis) is rejected at load;
- Constant-node weights (Paddle exports) become initializers, or the quantizer skips them;
- shape inference: symbolic first, plain ONNX inference when symbolic fails.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.contracts.bundle import TensorSpec

log = logging.getLogger(__name__)

MIN_OPSET = 13
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


class PrepareError(Exception):
    """The model cannot be prepared; the message says why and what to do."""


@dataclass
class PreparedModel:
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    ops: dict[str, int]
    opset: int
    notes: list[str] = field(default_factory=list)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise PrepareError("packing needs the host tools: pip install 'edge-runtime[pack]'") from e
    return onnx


def tensor_specs(values: Any) -> list[TensorSpec]:
    onnx = _onnx()
    specs = []
    for v in values:
        tt = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
        shape: list[int | str] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim
        ]
        specs.append(TensorSpec(name=v.name, dtype=dtype, shape=shape))
    return specs


def graph_inputs(model: Any) -> list[Any]:
    """Real inputs: old exports also list initializers as graph inputs."""
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def op_histogram(model: Any) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        counts[node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}.{node.op_type}"] += 1
    return dict(counts.most_common())


def load_checked(path: Path) -> Any:
    onnx = _onnx()
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises ValidationError, DecodeError, OSError
        raise PrepareError(f"{path} is not a valid ONNX model: {e}") from e
    return model


def _constants_to_initializers(model: Any) -> int:
    onnx = _onnx()
    keep, moved = [], 0
    for node in model.graph.node:
        attr = node.attribute[0] if len(node.attribute) == 1 else None
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS and attr and attr.name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            model.graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return moved


def prepare(source: Path, workdir: Path) -> PreparedModel:
    onnx = _onnx()
    model = load_checked(source)
    notes: list[str] = []
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    if foreign:
        raise PrepareError(
            f"graph holds non-standard ops {', '.join(foreign)}: it looks already optimized/fused by "
            "ONNX Runtime, and quantizing a fused graph gives a model that does not load. "
            "Pack the original export instead."
        )
    opset = next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise PrepareError(f"cannot upgrade opset {opset} to {MIN_OPSET}: {e}") from e
        notes.append(f"opset upgraded {opset} -> {MIN_OPSET}")
        opset = MIN_OPSET
    moved = _constants_to_initializers(model)
    if moved:
        notes.append(f"{moved} Constant nodes turned into initializers")
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    inits = {i.name for i in model.graph.initializer}
    if any(i.name in inits for i in model.graph.input):
        kept = [i for i in model.graph.input if i.name not in inits]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        notes.append("initializers removed from graph inputs")

    workdir.mkdir(parents=True, exist_ok=True)
    staged = workdir / "staged.onnx"
    out = workdir / "prepared.onnx"
    onnx.save(model, str(staged))
    _shape_inference(staged, out, notes)
    prepared = onnx.load(str(out))
    onnx.checker.check_model(prepared)
    fused = sorted({n.op_type for n in prepared.graph.node if n.domain not in STANDARD_DOMAINS})
    if fused:
        raise PrepareError(f"pre-processing introduced non-standard ops {fused}; refusing to quantize them")
    return PreparedModel(
        path=out,
        inputs=tensor_specs(graph_inputs(prepared)),
        outputs=tensor_specs(prepared.graph.output),
        ops=op_histogram(prepared),
        opset=opset,
        notes=notes,
    )


def _shape_inference(src: Path, dst: Path, notes: list[str]) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        # ORT's *basic* level only (constant folding, Conv+BatchNorm folding): standard ops,
        # checked below. Extended/all levels emit com.microsoft fused ops, which break QDQ.
        quant_pre_process(str(src), str(dst), skip_optimization=False, skip_symbolic_shape=False)
        notes.append("symbolic shape inference")
    except Exception as e:  # symbolic inference fails on most real exports
        log.info("symbolic shape inference failed (%s); falling back to ONNX shape inference", e)
        try:
            quant_pre_process(str(src), str(dst), skip_optimization=False, skip_symbolic_shape=True)
            notes.append(f"symbolic shape inference failed ({type(e).__name__}); used ONNX shape inference")
        except Exception as e2:
            onnx = _onnx()
            onnx.save(onnx.shape_inference.infer_shapes(onnx.load(str(src))), str(dst))
            notes.append(f"pre-processing failed ({type(e2).__name__}); used plain ONNX shape inference")


def compact(src: Path, dst: Path) -> None:
    """Shorten node and internal tensor names and drop doc strings in the shipped artifact.

    Quantized graphs have three times the nodes of the original, each with long generated
    names; on small models that protobuf overhead outweighs the weights (PP-OCR cls: 155 KB
    of 334 KB). Graph inputs and outputs keep their names: they are the model's API.
    """
    onnx = _onnx()
    model = onnx.load(str(src))
    g = model.graph
    keep = {v.name for v in g.input} | {v.name for v in g.output} | {""}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"t{len(mapping):x}"
        return mapping[name]

    ordered = _topological(g)
    del g.node[:]
    g.node.extend(ordered)
    for i, node in enumerate(g.node):
        node.name = f"n{i:x}"
        node.doc_string = ""
        node.input[:] = [short(x) for x in node.input]
        node.output[:] = [short(x) for x in node.output]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            onnx.save(onnx.load(str(src)), str(dst))  # subgraphs capture outer names: leave as is
            return
    for t in g.initializer:
        t.name = short(t.name)
        t.doc_string = ""
    for vi in g.value_info:
        vi.name = short(vi.name)
    model.doc_string = ""
    g.doc_string = ""
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _topological(graph: Any) -> list[Any]:
    """Nodes in dependency order (the fp16 converter appends its Casts at the end)."""
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            return list(graph.node)  # a cycle or an outer-scope name: keep the original order
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        pending = [n for n in pending if n not in ready]
    return ordered
