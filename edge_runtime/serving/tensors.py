"""Tensor specs against real arrays: input checks whose errors name the
expected and the received (used by the Runtime, the HTTP API and the frame sources)."""

from __future__ import annotations

import numpy as np

from edge_runtime.contracts.bundle import TensorSpec


class InputError(ValueError):
    """An input does not match what the model expects; the message says both."""


def describe(spec: TensorSpec) -> str:
    dims = ",".join("N" if isinstance(d, str) else str(d) for d in spec.shape)
    return f"[{dims}] ({spec.dtype})"


def check_inputs(specs: list[TensorSpec], feeds: dict[str, np.ndarray], allow_nonfinite: bool = False) -> int | None:
    """Validate feeds against specs; return the batch size (axis 0) shared by the inputs."""
    names = [s.name for s in specs]
    unknown = sorted(set(feeds) - set(names))
    missing = [n for n in names if n not in feeds]
    if unknown or missing:
        raise InputError(f"model inputs are {names}; missing {missing}, unexpected {unknown}")
    batch: int | None = None
    for spec in specs:
        arr = feeds[spec.name]
        got = f"[{','.join(map(str, arr.shape))}] ({arr.dtype})"
        if arr.dtype != np.dtype(spec.dtype):
            raise InputError(f"input {spec.name!r} expects dtype {spec.dtype} {describe(spec)}, got {got}")
        if arr.ndim != len(spec.shape):
            raise InputError(f"input {spec.name!r} expects rank {len(spec.shape)} {describe(spec)}, got {got}")
        for axis, (want, have) in enumerate(zip(spec.shape, arr.shape, strict=True)):
            if isinstance(want, int) and want > 0 and want != have:
                raise InputError(f"input {spec.name!r} expects shape {describe(spec)}, got {got} (axis {axis})")
            if have == 0:
                raise InputError(f"input {spec.name!r} has an empty axis {axis}: {got}")
        if not allow_nonfinite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"input {spec.name!r} holds NaN or Inf values; the model expects finite numbers")
        if arr.ndim and isinstance(spec.shape[0], str):
            if batch is not None and arr.shape[0] != batch:
                raise InputError(f"inputs disagree on the batch size (axis 0): {batch} and {arr.shape[0]}")
            batch = int(arr.shape[0])
    return batch
