"""Whether a TFLite artifact can be batched on the device, checked by running it.

Converters write TFLite models with a batch axis of 1 (or -1 in the shape signature). LiteRT can
resize that axis for most models (convolutions, dense layers), so the daemon's batcher can hand it
N rows at once: the packer proves it for each artifact by running a batch of 2 under LiteRT and
comparing it with the two rows run one at a time. An artifact for an accelerator (static shapes:
the NPU profile) or a declared stateful model is never batched.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edge_runtime.contracts.bundle import TensorSpec

log = logging.getLogger(__name__)


def _sample(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    shape = [1, *(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape[1:])]
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "f":
        return rng.uniform(0, 1, shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)


def batching_by_resize(
    content: bytes, inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, Any]] | None:
    """Run a batch of 2 and its two rows under LiteRT; if they agree, the specs with a free batch
    axis ("N") and the batching to record. None when the model cannot be batched (with the reason logged)."""
    from edge_runtime.backends import BackendOptions, create_backend

    if not inputs or any(not t.shape or t.shape[0] not in (1, -1, "N") for t in inputs + outputs):
        return None
    rng = np.random.default_rng(0)
    rows = [{t.name: _sample(t, rng) for t in inputs} for _ in range(2)]
    try:
        backend = create_backend("litert", content, BackendOptions(threads=1))
        single = [backend.run(r) for r in rows]
        both = backend.run({t.name: np.concatenate([r[t.name] for r in rows]) for t in inputs})
        backend.close()
    except Exception as e:  # the interpreter refused the new shape: the artifact stays at batch 1
        log.info("TFLite artifact cannot be resized to batch 2: %s", e)
        return None
    for i, out in enumerate(both):
        want = np.concatenate([s[i] for s in single])
        if out.shape != want.shape or not np.allclose(out, want, rtol=1e-4, atol=1e-5):
            log.info("TFLite artifact at batch 2 differs from its rows run one at a time (output %d)", i)
            return None

    def free(t: TensorSpec) -> TensorSpec:
        return t.model_copy(update={"shape": ["N", *t.shape[1:]]})

    batching = {
        "max_batch": 0, "batchable": True, "stateful": False,
        "reason": "batch axis resized by LiteRT (checked at pack time: a batch of 2 equals its rows run one at a time)",
    }  # fmt: skip
    return [free(t) for t in inputs], [free(t) for t in outputs], batching
