"""What a pack is asked to do and what it returns; shared by every artifact's flow."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_runtime.contracts.bundle import BundleManifest, PreprocessSpec, TensorSpec
from edge_runtime.pack.quantize import CalibMethod
from edge_runtime.pack.validate import Gate


class PackError(Exception):
    """Packing failed; nothing was written. ``report`` holds what was measured, if anything."""

    def __init__(self, message: str, report: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class PackRequest:
    model: Path
    target: str
    calib: Path
    eval: Path
    name: str
    version: str
    key: Path
    out: Path | None = None
    preprocess: PreprocessSpec | None = None
    labels: list[str] | None = None
    precision: Literal["int8", "fp16", "fp32", "auto"] = "int8"  # auto: pack/auto.py
    calibration: CalibMethod = "auto"
    gate: Gate = field(default_factory=Gate)
    recover: bool = True
    max_calib: int | None = None
    max_eval: int | None = None
    stateful: bool = False
    artifact: str | None = None  # onnx | tflite; default: the target's first
    judge: str = "auto"  # auto | host | aarch64: whose kernels judge the candidate (pack/judge.py)
    allow_slower: bool = False  # ship a candidate slower than fp32 where the latency gate applies
    bias_correction: bool = True  # static INT8: correct layer biases on calibration data (bias_correction.py)
    smooth_activations: float | None = None  # static INT8 (ONNX): migrate activation range into weights (smoothing.py)


@dataclass
class PackResult:
    path: Path
    manifest: BundleManifest
    report: dict[str, Any]


def batching_of(inputs: list[TensorSpec], outputs: list[TensorSpec], stateful: bool) -> dict[str, Any]:
    """Can requests be stacked along axis 0? Fixed batch 1, scalars and state tensors say no."""
    first = [t.shape[0] if t.shape else None for t in inputs + outputs]
    if stateful:
        return {"max_batch": 1, "batchable": False, "stateful": True, "reason": "declared stateful"}
    if any(d is None for d in first):
        return {"max_batch": 1, "batchable": False, "stateful": False, "reason": "scalar input/output"}
    if all(isinstance(d, int) for d in first):
        n = int(first[0]) if len({*first}) == 1 and isinstance(first[0], int) else 1
        n = max(n, 1)  # -1 (a TFLite shape signature's free axis that could not be resized) runs 1 row
        return {"max_batch": n, "batchable": False, "stateful": False, "reason": f"fixed batch {n}"}
    if not all(isinstance(d, str) for d in first):
        return {
            "max_batch": 1,
            "batchable": False,
            "stateful": False,
            "reason": "mixed axis 0 (state tensor?)",
        }
    return {"max_batch": 0, "batchable": True, "stateful": False, "reason": "dynamic axis 0"}
