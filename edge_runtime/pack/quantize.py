"""INT8 quantization (ONNX Runtime) and FP16 conversion.

Static QDQ with per-channel weights for convolutional models; dynamic quantization only for
MatMul/transformer-style models (dynamic on CNNs emits ConvInteger, 4-7x slower). The target
profile picks the flavour: U8S8 for x86, symmetric S8S8 for ARM and TensorRT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_runtime.pack.datasets import Sample, SampleReader
from edge_runtime.pack.targets import TargetProfile

CalibMethod = Literal["minmax", "entropy", "percentile"]
CONV_OPS = {"Conv", "ConvTranspose"}
# Recovery step: quantize only where INT8 pays (weights and MACs) and keep the elementwise,
# pooling, Resize and Concat glue in float. On DBNet this took cosine 0.84 -> 0.93.
COMPUTE_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]
MATMUL_OPS = {"MatMul", "Gemm", "LSTM", "GRU", "Attention", "Einsum"}


@dataclass
class QuantSettings:
    mode: Literal["static", "dynamic", "none"]
    precision: Literal["int8", "fp16", "fp32"]
    flavour: str = ""
    calibration: str = ""
    per_channel: bool = False
    activation_symmetric: bool = False
    weight_symmetric: bool = False
    calibration_samples: int = 0
    reduce_range: bool = False
    op_types: list[str] | None = None
    excluded_nodes: list[str] = field(default_factory=list)

    def as_manifest(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None and v != ""}


def choose_mode(ops: dict[str, int], profile: TargetProfile) -> Literal["static", "dynamic"]:
    if profile.name == "jetson-gpu":
        return "static"  # TensorRT runs Q/DQ pairs, not ConvInteger/MatMulInteger/DynamicQuantizeLinear
    if CONV_OPS & ops.keys():
        return "static"
    if MATMUL_OPS & ops.keys():
        return "dynamic"
    return "static"


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def quantize_int8(
    src: Path,
    dst: Path,
    calib: list[Sample],
    profile: TargetProfile,
    mode: Literal["static", "dynamic"],
    method: CalibMethod = "minmax",
    exclude: list[str] | None = None,
    on_sample: Callable[[], None] | None = None,
    op_types: list[str] | None = None,
) -> QuantSettings:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    exclude = list(exclude or [])
    settings = QuantSettings(
        mode=mode,
        precision="int8",
        flavour=profile.flavour if mode == "static" else "dynamic-S8",
        per_channel=profile.per_channel,
        activation_symmetric=profile.activation_symmetric,
        weight_symmetric=profile.weight_symmetric,
        reduce_range=profile.reduce_range,
        op_types=op_types,
        excluded_nodes=exclude,
    )
    if mode == "dynamic":
        quantize_dynamic(
            str(src),
            str(dst),
            per_channel=profile.per_channel,
            weight_type=_qtype("int8"),
            nodes_to_exclude=exclude,
            op_types_to_quantize=op_types,
            extra_options={"WeightSymmetric": True},
        )
        return settings

    class Reader(SampleReader, CalibrationDataReader):
        pass

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    quantize_static(
        str(src),
        str(dst),
        Reader(calib, on_sample),
        quant_format=QuantFormat.QDQ,
        per_channel=profile.per_channel,
        reduce_range=profile.reduce_range,
        activation_type=_qtype(profile.activation_type),
        weight_type=_qtype(profile.weight_type),
        calibrate_method=methods[method],
        nodes_to_exclude=exclude,
        op_types_to_quantize=op_types,
        extra_options={
            "ActivationSymmetric": profile.activation_symmetric,
            "WeightSymmetric": profile.weight_symmetric,
            # Percentile and entropy calibration hold every activation histogram in memory.
            "CalibMovingAverage": False,
        },
    )
    settings.calibration = method
    settings.calibration_samples = len(calib)
    return settings


def convert_fp16(src: Path, dst: Path) -> QuantSettings:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    return QuantSettings(mode="none", precision="fp16")
