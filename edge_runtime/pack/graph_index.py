"""The lookups every graph rewrite needs: initializers by name, who produces and who reads each
tensor, and the graph's outputs. Built once from an ONNX graph; stale once the graph changes."""

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
