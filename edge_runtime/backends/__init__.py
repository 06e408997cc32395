"""Backend registry: a short key to "module:Class", imported only when chosen, so a device
without a runtime's package installed still runs the others."""

from __future__ import annotations

import importlib

from edge_runtime.backends.base import Backend, BackendOptions

REGISTRY: dict[str, tuple[str, str]] = {
    "onnxruntime": ("edge_runtime.backends.onnxruntime:OnnxRuntimeBackend", "edge-runtime[onnx]"),
    "litert": ("edge_runtime.backends.litert:LiteRTBackend", "edge-runtime[litert]"),
}


def create_backend(runtime: str, model: bytes, options: BackendOptions) -> Backend:
    try:
        target, extra = REGISTRY[runtime]
    except KeyError:
        raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(REGISTRY)}") from None
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, cls_name)
        backend: Backend = cls(model, options)
        return backend
    except ImportError as e:
        raise RuntimeError(f"runtime {runtime!r} is not installed: pip install '{extra}' ({e})") from e


__all__ = ["REGISTRY", "Backend", "BackendOptions", "create_backend"]
