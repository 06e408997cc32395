"""Run a model over saved inputs with the device's own backend, in a separate process.

    python -m edge_runtime.backends.run_npz JOB.json

JOB.json: {"model": PATH, "runtime": "onnxruntime"|"litert", "inputs": NPZ, "outputs": NPZ,
"names": [input names], "samples": N, "threads": T}. The inputs hold ``s{i}_{j}`` (sample i,
input j of ``names``); the outputs get ``s{i}_{k}`` (output k). A last line of JSON on stdout
says which runtime and machine computed them.

This is how the packer judges an artifact on another CPU's kernels (aarch64 under qemu-user,
pack/emulation.py): the job runs inside that CPU's root file system with only numpy and the
runtime, through the same backend classes the daemon serves with, so the figures are what a
device computes. Nothing is unpickled: arrays travel as .npz read with allow_pickle=False.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

from edge_runtime.backends import BackendOptions, create_backend


def run_job(job: dict[str, object]) -> dict[str, object]:
    model = Path(str(job["model"])).read_bytes()
    runtime = str(job["runtime"])
    names = [str(n) for n in job["names"]]  # type: ignore[attr-defined]
    count = int(job["samples"])  # type: ignore[call-overload]
    backend = create_backend(runtime, model, BackendOptions(threads=int(job.get("threads", 1))))  # type: ignore[call-overload]
    out: dict[str, np.ndarray] = {}
    try:
        with np.load(str(job["inputs"]), allow_pickle=False) as data:
            for i in range(count):
                feeds = {name: data[f"s{i}_{j}"] for j, name in enumerate(names)}
                for k, arr in enumerate(backend.run(feeds)):
                    out[f"s{i}_{k}"] = np.asarray(arr)
    finally:
        backend.close()
    np.savez(str(job["outputs"]), **out)  # type: ignore[arg-type]
    if runtime == "onnxruntime":
        import onnxruntime

        version = f"onnxruntime {onnxruntime.__version__}"
    else:
        from importlib.metadata import version as dist_version

        version = f"ai-edge-litert {dist_version('ai-edge-litert')}"
    return {"machine": platform.machine(), "runtime": version, "providers": backend.active_providers}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m edge_runtime.backends.run_npz JOB.json", file=sys.stderr)
        return 2
    info = run_job(json.loads(Path(argv[0]).read_text()))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
