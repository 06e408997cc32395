"""The one small interface every runtime sits behind. Backends know nothing of bundles,
HTTP or MQTT: they load a model (bytes) with options and run arrays."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class BackendOptions:
    threads: int = 0  # 0 = the runtime's default
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    delegate: str | None = None  # LiteRT external delegate library path (NPUs)
    spin: bool = True  # ONNX Runtime intra-op spin-waiting


class Backend(Protocol):
    name: str
    active_providers: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def close(self) -> None: ...
