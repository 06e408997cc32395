"""edge-runtime: signed INT8 model bundles, a warm on-device daemon, fleet rollouts over MQTT."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from edge_runtime.serving.runtime import Runtime


def __getattr__(name: str) -> Any:
    # Lazy: `import edge_runtime` must not pull ONNX Runtime or OpenCV in.
    if name == "Runtime":
        from edge_runtime.serving.runtime import Runtime

        return Runtime
    raise AttributeError(name)


__all__ = ["Runtime", "__version__"]
