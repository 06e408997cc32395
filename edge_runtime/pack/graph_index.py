"""What the graph rewrites and measurements share: the lookups (initializers by name, who produces
and who reads each tensor, the graph's outputs; built once, stale once the graph changes) and a
copy of a model that also outputs chosen intermediate tensors, to measure them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GraphIndex:
    inits: dict[str, Any]  # name -> TensorProto
    producer: dict[str, Any]  # tensor -> the node that outputs it
    consumers: dict[str, list[Any]]  # tensor -> the nodes that read it
    outputs: set[str]  # the graph's output names

    @classmethod
    def of(cls, graph: Any) -> GraphIndex:
        consumers: dict[str, list[Any]] = {}
        for n in graph.node:
            for name in n.input:
                consumers.setdefault(name, []).append(n)
        return cls(
            inits={i.name: i for i in graph.initializer},
            producer={o: n for n in graph.node for o in n.output},
            consumers=consumers,
            outputs={o.name for o in graph.output},
        )


def exposing(model: Any, names: list[str]) -> Any:
    """A copy of ``model`` that also outputs the tensors ``names`` (those not outputs already)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in dict.fromkeys(names) if n not in have)
    return m
