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
        self._inputs = {d["name"]: d for d in self._interp.get_input_details()}
        self._outputs = self._interp.get_output_details()
        self._shapes: dict[str, tuple[int, ...]] = {n: tuple(d["shape"]) for n, d in self._inputs.items()}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        resized = False
        for name, arr in feeds.items():
            if tuple(arr.shape) != self._shapes[name]:
                self._interp.resize_tensor_input(self._inputs[name]["index"], list(arr.shape))
                self._shapes[name] = tuple(arr.shape)
                resized = True
        if resized:
            self._interp.allocate_tensors()
        for name, arr in feeds.items():
            self._interp.set_tensor(self._inputs[name]["index"], arr)
        self._interp.invoke()
        return [np.array(self._interp.get_tensor(o["index"])) for o in self._outputs]

    def close(self) -> None:
        del self._interp
