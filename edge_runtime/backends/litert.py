"""LiteRT (ai-edge-litert) backend: XNNPACK by default, an external delegate for NPUs.

A delegate that cannot be loaded falls back to XNNPACK with a warning: the device keeps
serving, and the warning says the accelerator is not in use.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edge_runtime.backends.base import BackendOptions

log = logging.getLogger(__name__)


class LiteRTBackend:
    """Runs a TFLite model in LiteRT (XNNPACK, or an external NPU delegate with a fallback to the CPU).

    Owns the interpreter and the int8 (de)quantization of full-integer inputs and outputs. Knows
    nothing of bundles, batching or HTTP: it takes model bytes and options and runs arrays."""

    name = "litert"

    def __init__(self, model: bytes, options: BackendOptions) -> None:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        delegates: list[Any] = []
        self.active_providers: list[str] = ["XNNPACK"]
        if options.delegate:
            try:
                delegates.append(load_delegate(options.delegate))
                self.active_providers = [f"delegate:{options.delegate}"]
            except (ValueError, OSError, RuntimeError) as e:
                log.warning(
                    "cannot load delegate %s (%s); falling back to XNNPACK on the CPU", options.delegate, str(e)
                )
        self._interp = Interpreter(
            model_content=model, num_threads=options.threads or None, experimental_delegates=delegates or None
        )
        self._interp.allocate_tensors()
        self._order = self._interp.get_input_details()
        self._inputs = {d["name"]: d for d in self._order}
        self._outputs = self._interp.get_output_details()
        self._shapes: dict[str, tuple[int, ...]] = {n: tuple(d["shape"]) for n, d in self._inputs.items()}

    def _detail(self, name: str, position: int) -> dict[str, Any]:
        # The manifest names inputs as the source model did (``x``); converters rename the
        # tensors (``serving_default_x:0``). The manifest lists them in the interpreter's order.
        d = self._inputs.get(name)
        return d if d is not None else self._order[position]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        resized = False
        details = [self._detail(name, i) for i, name in enumerate(feeds)]
        for d, arr in zip(details, feeds.values(), strict=True):
            if tuple(arr.shape) != self._shapes[d["name"]]:
                self._interp.resize_tensor_input(d["index"], list(arr.shape))
                self._shapes[d["name"]] = tuple(arr.shape)
                resized = True
        if resized:
            self._interp.allocate_tensors()
        for d, arr in zip(details, feeds.values(), strict=True):
            self._interp.set_tensor(d["index"], _quantize(arr, d))
        self._interp.invoke()
        return [_dequantize(np.array(self._interp.get_tensor(o["index"])), o) for o in self._outputs]

    def close(self) -> None:
        del self._interp


def _quantize(arr: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Full-integer models (NPU profile) take int8/uint8 inputs: float frames are quantized with
    the input tensor's own scale and zero point, as the CPU side of an NPU pipeline does."""
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail["quantization"]
    if dtype.kind in "iu" and arr.dtype.kind == "f" and scale:
        info = np.iinfo(dtype)
        return np.clip(np.round(arr / scale + zero), info.min, info.max).astype(dtype)
    return arr


def _dequantize(arr: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    scale, zero = detail["quantization"]
    if arr.dtype.kind in "iu" and scale:
        return ((arr.astype(np.float32) - zero) * scale).astype(np.float32)
    return arr
