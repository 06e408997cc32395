"""ONNX Runtime backend: execution providers per target, CPU fallback with a warning."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edge_runtime.backends.base import BackendOptions

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: bytes, options: BackendOptions) -> None:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        wanted = options.providers or ["CPUExecutionProvider"]
        providers: list[Any] = []
        for p in wanted:
            if p in available:
                providers.append((p, options.provider_options.get(p, {})))
            else:
                log.warning("execution provider %s is not available here; falling back", p)
        if not any(p[0] == "CPUExecutionProvider" for p in providers):
            providers.append(("CPUExecutionProvider", {}))
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if options.threads:
            opts.intra_op_num_threads = options.threads
        opts.inter_op_num_threads = 1
        if not options.spin:
            # On a few cores shared with HTTP and capture threads, spinning workers steal the CPU
            # those threads need between runs.
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Loading from bytes: a model cannot reach files through external-data references.
        self._session = ort.InferenceSession(model, opts, providers=providers)
        self.active_providers: list[str] = list(self._session.get_providers())
        self._outputs = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._session.run(self._outputs, feeds))

    def close(self) -> None:
        del self._session
