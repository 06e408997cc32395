"""Target profiles, loaded from contracts/targets.toml (profiles are data, not code branches)."""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_runtime.contracts.targets import target_table


class TargetProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    description: str
    arch: list[Literal["x86_64", "aarch64"]]
    cpu_flags: list[str] = Field(default_factory=list)  # the device's CPU has at least one (targets.toml)
    runtime: Literal["onnxruntime", "litert"]
    artifact: Literal["onnx", "tflite"]
    activation_type: Literal["uint8", "int8"]
    weight_type: Literal["uint8", "int8"]
    activation_symmetric: bool
    weight_symmetric: bool
    per_channel: bool
    reduce_range: bool
    validate_exact: bool = False
    providers: list[str]
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    batch_profile: dict[str, int] | None = None
    unsupported_ops: list[str] = Field(default_factory=list)
    unsupported_source: str = ""
    artifacts: list[Literal["onnx", "tflite"]] = Field(default_factory=list)  # all it can ship; first = default
    int8_io: bool = False  # full-integer including the model's inputs and outputs (NPUs)
    allowed_ops: list[str] = Field(default_factory=list)  # TFLite builtin ops the accelerator runs
    allowed_source: str = ""
    max_rank: int = 0
    delegate_hint: str | None = None  # the external delegate library devices of this class load
    judge_arch: Literal["aarch64"] | None = None  # the CPU whose kernels judge it (pack/judge.py)

    @property
    def all_artifacts(self) -> list[str]:
        return list(self.artifacts) or [self.artifact]

    def unsupported(self, ops: dict[str, int]) -> list[str]:
        """Ops of a model (op histogram) that this target cannot run."""
        return sorted(op for op in ops if op in self.unsupported_ops or "." in op)

    @property
    def flavour(self) -> str:
        return ("U8" if self.activation_type == "uint8" else "S8") + ("U8" if self.weight_type == "uint8" else "S8")


@cache
def targets() -> dict[str, TargetProfile]:
    return {name: TargetProfile(name=name, **fields) for name, fields in target_table().items()}


def get_target(name: str) -> TargetProfile:
    known = targets()
    if name not in known:
        raise ValueError(f"unknown target {name!r}; expected one of: {', '.join(known)}")
    return known[name]
