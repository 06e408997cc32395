"""`edgert pack` for TFLite artifacts (arm64-cpu with XNNPACK, npu): full-integer INT8 through
TensorFlow's TFLiteConverter, with the same calibration reader, preprocessing, comparison, gate
and report as the ONNX path.

    source .keras / SavedModel dir  -> TFLiteConverter (float and INT8)          [tool env]
    source .onnx                    -> onnx2tf (SavedModel, NHWC, batch 1) -> same [tool env]
    fp32 reference                  -> ONNX Runtime on the ONNX model, or LiteRT on the float TFLite
    candidate                       -> LiteRT (the device's own backend code) on the INT8 TFLite
    npu                             -> int8 inputs/outputs, then every node checked: integer only,
                                       ops on the accelerator's list, static shapes, ranks

TensorFlow runs in the isolated tool environment (toolenv.py), never in this process.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edge_runtime.backends import BackendOptions, create_backend
from edge_runtime.contracts.bundle import PreprocessSpec, TensorSpec
from edge_runtime.pack import toolenv
from edge_runtime.pack.datasets import Sample
from edge_runtime.pack.flow import finish, load_held_out, prepare_onnx, record_gate, refuse_if_failed
from edge_runtime.pack.formats import model_format, source_sha256
from edge_runtime.pack.input_stats import input_stats
from edge_runtime.pack.judge import choose
from edge_runtime.pack.request import PackError, PackRequest, PackResult, batching_of
from edge_runtime.pack.rewrites import rewrite_for_int8
from edge_runtime.pack.targets import TargetProfile
from edge_runtime.pack.tflite_batch import batching_by_resize
from edge_runtime.pack.tflite_inspect import describe, npu_problems
from edge_runtime.pack.validate import compare, run_all, session

CONVERTER = Path(__file__).with_name("tflite_convert.py")


def source_kind(path: Path) -> str:
    kind = model_format(path)  # from the content, not the suffix
    if kind == "tflite":
        raise ValueError(f"{path} is already a TFLite model; pack its source (ONNX, Keras or SavedModel)")
    return kind


def _run_tool(request: dict[str, Any], tmp: Path, console: Console) -> dict[str, Any]:
    py = toolenv.ensure(lambda m: console.log(m))
    req_file = tmp / f"request-{time.monotonic_ns()}.json"
    req_file.write_text(json.dumps(request))
    what = "reading the model's signature" if request.get("probe") else f"converting {request['kind']} to INT8 TFLite"
    with console.status(f"{what} (TensorFlow, in its own environment)"):
        proc = subprocess.run(
            [str(py), str(CONVERTER), str(req_file)],
            capture_output=True,
            text=True,
            cwd=tmp,
            env=toolenv.offline_env(),
            timeout=1800,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"TFLite conversion failed:\n{(proc.stderr or proc.stdout)[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _tf_safe_names(src: Path, out: Path) -> Path:
    """The model with node names TensorFlow accepts as scopes (``^[A-Za-z0-9_.\\/>-]*$``): onnx2tf
    names its layers after the ONNX nodes, and a name such as PaddleOCR's ``Softmax@0`` fails the
    conversion. Tensor names (the inputs and outputs clients use) are left alone."""
    import re

    import onnx

    model = onnx.load(str(src))
    bad = re.compile(r"[^A-Za-z0-9_./>-]")
    changed = 0
    for node in model.graph.node:
        if node.name and bad.search(node.name):
            node.name = bad.sub("_", node.name)
            changed += 1
    if not changed:
        return src
    onnx.save(model, str(out))
    return out


def _nhwc(samples: list[Sample], to_nhwc: set[str]) -> list[Sample]:
    return [
        Sample({k: (v.transpose(0, 2, 3, 1) if k in to_nhwc else v) for k, v in s.feeds.items()}, s.source, s.label)
        for s in samples
    ]


def _litert_outputs(content: bytes, samples: list[Sample], names: list[str]) -> list[list[np.ndarray]]:
    backend = create_backend("litert", content, BackendOptions(threads=1))
    try:
        return [backend.run({n: s.feeds[n] for n in names}) for s in samples]
    finally:
        backend.close()


def _latency(content: bytes, samples: list[Sample], names: list[str], runs: int = 50) -> dict[str, float]:
    backend = create_backend("litert", content, BackendOptions(threads=1))
    try:
        feeds = {n: samples[0].feeds[n] for n in names}
        for _ in range(5):
            backend.run(feeds)
        t = []
        for _ in range(runs):
            t0 = time.perf_counter()
            backend.run(feeds)
            t.append((time.perf_counter() - t0) * 1000)
        return {"p50": float(np.percentile(t, 50)), "p90": float(np.percentile(t, 90))}
    finally:
        backend.close()


def pack_tflite(req: PackRequest, profile: TargetProfile, tmp: Path, console: Console, cwd: Path) -> PackResult:
    judge = choose(req.judge, profile)
    kind = source_kind(req.model)
    if req.precision != "int8":
        raise PackError(
            f"target {profile.name} with TFLite builds full-integer INT8 only (got --precision {req.precision})"
        )
    if req.smooth_activations is not None:
        raise PackError("--smooth-activations applies to ONNX artifacts (TensorFlow's converter calibrates TFLite)")
    preprocess: PreprocessSpec | None = req.preprocess
    to_nhwc: set[str] = set()
    rewrites: dict[str, int] = {}
    if kind == "onnx":
        prep = prepare_onnx(req, tmp)
        source_specs = prep.inputs
        output_names = [o.name for o in prep.outputs]
        to_nhwc = {s.name for s in source_specs if len(s.shape) == 4}
        rewrites = rewrite_for_int8(prep.path, tmp / "rewritten.onnx", relu6=True)
        if rewrites:
            console.log(f"  rewrote {', '.join(f'{n} {op}' for op, n in rewrites.items())} as ReLU6 forms")
        tool_source = _tf_safe_names(tmp / "rewritten.onnx" if rewrites else prep.path, tmp / "for-tf.onnx")
    else:
        source = req.model
        if kind == "keras" and source.suffix != ".keras":  # Keras loads archives by their suffix only
            source = tmp / "source.keras"
            shutil.copyfile(req.model, source)
        probe = _run_tool({"kind": kind, "source": str(source), "workdir": str(tmp), "probe": True}, tmp, console)
        source_specs = [
            TensorSpec(name=i["name"], dtype=i["dtype"], shape=["N", *i["shape"][1:]]) for i in probe["inputs"]
        ]
        output_names = list(probe.get("output_names") or [])
        tool_source = source

    calib, evals = load_held_out(req, source_specs, console)
    calib_t, evals_t = _nhwc(calib, to_nhwc), _nhwc(evals, to_nhwc)
    stacked = {k: np.concatenate([s.feeds[k] for s in calib_t]) for k in calib_t[0].feeds}
    np.savez(tmp / "calib.npz", **stacked)  # type: ignore[arg-type]
    console.log(
        f"calibration: {len(calib)} samples; evaluation: {len(evals)}; converting {kind} with TensorFlow "
        f"in {toolenv.env_path()} (network off)"
    )
    t0 = time.perf_counter()
    info = _run_tool(
        {
            "kind": kind,
            "source": str(tool_source),
            "workdir": str(tmp),
            "calib": str(tmp / "calib.npz"),
            "int8_io": profile.int8_io,
            "out_int8": str(tmp / "int8.tflite"),
            "out_float": str(tmp / "float.tflite"),
        },
        tmp,
        console,
    )
    convert_s = time.perf_counter() - t0
    int8, flt = (tmp / "int8.tflite").read_bytes(), (tmp / "float.tflite").read_bytes()
    order = [i["name"] for i in info["inputs"]]
    names = info["input_order"]
    if len(order) != len(names):
        raise PackError(f"converted model has inputs {order}, the source {names}")

    # Reference: the fp32 original (ONNX Runtime on the ONNX model; the float TFLite otherwise).
    if kind == "onnx":
        reference = run_all(session(prep.path), evals, output_names)
    else:
        reference = _litert_outputs(flt, evals_t, names)
        if len(output_names) != len(info["outputs"]):
            output_names = [o["name"] for o in info["outputs"]]
    if judge.where == "aarch64":
        candidate = judge.run(int8, "litert", evals_t, names, console)
    else:
        candidate = _litert_outputs(int8, evals_t, names)
    for i, (r, c) in enumerate(zip(reference[0], candidate[0], strict=False)):
        if r.ndim == 4 and c.shape == r.transpose(0, 2, 3, 1).shape and c.shape != r.shape:
            candidate = [[*o[:i], o[i].transpose(0, 3, 1, 2), *o[i + 1 :]] for o in candidate]  # NHWC back
    report = compare(reference, candidate, output_names, evals, req.labels)
    failures = req.gate.check(report)
    desc = describe(int8)
    record_gate(req, report, failures)
    report["recovery"] = {
        "attempts": [{"op_types": "all", "kept_float": [], "failures": failures}],
        "kept_float": [],
        "op_types": [],
    }
    report["rewrites"] = rewrites
    report["judged_on"] = judge.describe("LiteRT XNNPACK on this host, 1 thread")
    report["validated_with"] = report["judged_on"]["kernels"]
    report["size"] = {
        "reference_bytes": len(flt),
        "candidate_bytes": len(int8),
        "ratio": len(flt) / len(int8),
        "source_bytes": req.model.stat().st_size if req.model.is_file() else None,
        "reference_gzip_bytes": len(gzip.compress(flt, 6)),
        "candidate_gzip_bytes": len(gzip.compress(int8, 6)),
    }
    report["conversion"] = {
        "tool": kind if kind != "onnx" else "onnx2tf + TFLiteConverter",
        "seconds": convert_s,
        "ops": desc["op_histogram"],
    }
    problems = npu_problems(desc, profile) if profile.name == "npu" else []
    report["npu"] = {"problems": problems} if profile.name == "npu" else None
    if problems:
        raise PackError(
            f"target npu refuses this model ({len(problems)} problems; it would fall back to the "
            "CPU):\n  " + "\n  ".join(problems[:40]),
            report,
        )
    refuse_if_failed(report, failures)
    report["size"]["gzip_ratio"] = report["size"]["reference_gzip_bytes"] / report["size"]["candidate_gzip_bytes"]
    report["latency_ms"] = {  # LiteRT, static batch 1
        "reference": {"batch1": _latency(flt, evals_t, names), "batch8": None},
        "candidate": {"batch1": _latency(int8, evals_t, names), "batch8": None},
    }

    source_sha = source_sha256(req.model)
    tensors = desc["tensors"]
    inputs = [
        TensorSpec(
            name=n, dtype="float32" if profile.int8_io else tensors[i]["dtype"], shape=tensors[i]["shape_signature"]
        )
        for n, i in zip(names, desc["inputs"], strict=True)
    ]
    outputs = [
        TensorSpec(
            name=n, dtype="float32" if profile.int8_io else tensors[i]["dtype"], shape=tensors[i]["shape_signature"]
        )
        for n, i in zip(output_names, desc["outputs"], strict=True)
    ]
    if preprocess is not None and to_nhwc:
        preprocess = preprocess.model_copy(update={"layout": "nhwc"})
    io_quant = {
        t["name"]: tensors[i]["quantization"] for t, i in [(tensors[i], i) for i in desc["inputs"] + desc["outputs"]]
    }
    batching = batching_of(inputs, outputs, req.stateful)
    if not req.stateful and not profile.int8_io:  # accelerators compile static shapes: never resized
        resized = batching_by_resize(int8, inputs, outputs)
        if resized is not None:
            inputs, outputs, batching = resized
    fields: dict[str, Any] = {
        "name": req.name,
        "version": req.version,
        "target": profile.name,
        "runtime": "litert",
        "model": "model.tflite",
        "inputs": [i.model_dump() for i in inputs],
        "outputs": [o.model_dump() for o in outputs],
        "preprocess": preprocess.model_dump() if preprocess else None,
        "labels": req.labels,
        "precision": "int8",
        "quantization": {
            "mode": "static",
            "precision": "int8",
            "format": "tflite full-integer",
            "int8_io": profile.int8_io,
            "io_quantization": io_quant,
            "calibration": "representative dataset",
            "ops": desc["op_histogram"],
            "input_stats": input_stats(calib, req.preprocess.layout if req.preprocess else None),
            "rewrites": rewrites,
        },
        "validation": report,
        "runtime_options": {
            "artifact": "tflite",
            "delegate_hint": profile.delegate_hint,
            "choice": f"LiteRT ({'external delegate, ' if profile.delegate_hint else ''}XNNPACK)",
        },
        "batching": batching,
        "source_sha256": source_sha,
        "key_id": "",
    }
    files = {"model.tflite": int8}
    return finish(req, fields, files, report, cwd, console)
