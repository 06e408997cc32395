"""`edgert pack`: prepare -> calibrate/quantize -> validate -> gate (-> recover) -> sign -> bundle."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge_runtime.contracts.bundle import BundleManifest, PreprocessSpec, TensorSpec, load_private_key, write_bundle
from edge_runtime.pack.datasets import Sample, load_samples
from edge_runtime.pack.prepare import PrepareError, compact, prepare
from edge_runtime.pack.quantize import (
    COMPUTE_OPS,
    CalibMethod,
    QuantSettings,
    choose_mode,
    convert_fp16,
    quantize_int8,
)
from edge_runtime.pack.report import render_report
from edge_runtime.pack.targets import get_target
from edge_runtime.pack.validate import Gate, compare, latency_ms, layer_sensitivity, run_all, session

RECOVERY_STEPS = (1, 2, 4, 8, 16)


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
    precision: Literal["int8", "fp16", "fp32"] = "int8"
    calibration: CalibMethod = "minmax"
    gate: Gate = field(default_factory=Gate)
    recover: bool = True
    max_calib: int | None = None
    max_eval: int | None = None
    stateful: bool = False
    artifact: str | None = None  # onnx | tflite; default: the target's first


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
        return {"max_batch": n, "batchable": False, "stateful": False, "reason": f"fixed batch {n}"}
    if not all(isinstance(d, str) for d in first):
        return {
            "max_batch": 1,
            "batchable": False,
            "stateful": False,
            "reason": "mixed axis 0 (state tensor?)",
        }
    return {"max_batch": 0, "batchable": True, "stateful": False, "reason": "dynamic axis 0"}


def _digest(samples: list[Sample]) -> set[str]:
    return {hashlib.sha256(b"".join(a.tobytes() for a in s.feeds.values())).hexdigest() for s in samples}


def pack(req: PackRequest, console: Console | None = None) -> PackResult:
    console = console or Console(stderr=True, quiet=True)
    profile = get_target(req.target)
    artifact = req.artifact or profile.artifact
    if artifact not in profile.all_artifacts:
        raise PackError(f"target {profile.name} ships {' or '.join(profile.all_artifacts)} artifacts, not {artifact}")
    if artifact == "onnx" and req.model.suffix != ".onnx":
        raise PackError(f"{req.model}: ONNX artifacts are built from .onnx models; Keras and SavedModel "
                        "sources convert to TFLite (--artifact tflite, or --target npu)")  # fmt: skip
    key = load_private_key(req.key)
    source_bytes = req.model.read_bytes()
    # ONNX Runtime's shape inference writes scratch files (sym_shape_infer_temp.onnx, <uuid>.data
    # of several MB) into the working directory: work inside our temporary directory, with every
    # path of the request made absolute first.
    cwd = Path.cwd()
    req = dataclasses.replace(
        req, model=req.model.resolve(), calib=req.calib.resolve(), eval=req.eval.resolve(),
        key=req.key.resolve(), out=req.out.resolve() if req.out else None,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgert-pack-") as tmp_s, contextlib.chdir(tmp_s):
        tmp = Path(tmp_s)
        if artifact == "tflite":
            from edge_runtime.pack.tflite_pack import pack_tflite

            try:
                result: PackResult = pack_tflite(req, profile, tmp, console, Path(cwd))
                return result
            except (RuntimeError, ValueError, OSError) as e:
                raise PackError(str(e)) from e
        console.log(f"preparing {req.model.name} for {profile.name} ({profile.description})")
        try:
            prep = prepare(req.model, tmp / "prep")
        except PrepareError as e:
            raise PackError(str(e)) from e
        for note in prep.notes:
            console.log(f"  {note}")
        blocked = profile.unsupported(prep.ops)
        if blocked:
            raise PackError(f"target {profile.name} cannot run ops {blocked} ({profile.unsupported_source})")

        calib = load_samples(req.calib, prep.inputs, req.preprocess, req.max_calib)
        evals = load_samples(req.eval, prep.inputs, req.preprocess, req.max_eval)
        shared = _digest(calib) & _digest(evals)
        if shared:
            raise PackError(
                f"the evaluation set shares {len(shared)} samples with the calibration set; "
                "held-out data must be different images"
            )
        console.log(f"calibration: {len(calib)} samples from {req.calib}; evaluation: {len(evals)} from {req.eval}")
        output_names = [o.name for o in prep.outputs]
        reference = run_all(session(prep.path), evals, output_names)

        candidate = tmp / "model.onnx"
        mode = choose_mode(prep.ops, profile) if req.precision == "int8" else "none"

        def build(exclude: list[str], op_types: list[str] | None = None) -> tuple[QuantSettings, dict[str, Any]]:
            if req.precision == "int8":
                assert mode != "none"
                progress = _progress(console)
                on_sample = None
                with progress or nullcontext():
                    if progress is not None:
                        task = progress.add_task(f"calibrating ({req.calibration})", total=len(calib))
                        on_sample = lambda: progress.advance(task)  # noqa: E731
                    settings = quantize_int8(
                        prep.path,
                        candidate,
                        calib,
                        profile,
                        mode,
                        req.calibration,
                        exclude,
                        on_sample,
                        op_types,
                    )
            elif req.precision == "fp16":
                settings = convert_fp16(prep.path, candidate)
            else:
                shutil.copyfile(prep.path, candidate)
                settings = QuantSettings(mode="none", precision="fp32")
            outputs = run_all(session(candidate, exact=profile.validate_exact), evals, output_names)
            return settings, compare(reference, outputs, output_names, evals, req.labels)

        settings, report = build([])
        failures = req.gate.check(report)
        attempts: list[dict[str, Any]] = [{"op_types": "all", "kept_float": [], "failures": failures}]
        if failures and req.precision == "int8" and req.recover:
            # Recovery ladder: (1) quantize only the compute ops; (2) also keep the quantized
            # nodes that add the most measured error (on calibration data) in float.
            console.log(f"gate failed: {'; '.join(failures)}; trying to recover")
            settings, report = build([], COMPUTE_OPS)
            failures = req.gate.check(report)
            attempts.append({"op_types": COMPUTE_OPS, "kept_float": [], "failures": failures})
            console.log(f"  quantizing only {', '.join(COMPUTE_OPS)}: {'pass' if not failures else 'fail'}")
            if failures:
                ranked = layer_sensitivity(prep.path, candidate, calib[:8], COMPUTE_OPS)
                for k in RECOVERY_STEPS:
                    exclude = [n for n, _ in ranked[:k]]
                    settings, report = build(exclude, COMPUTE_OPS)
                    failures = req.gate.check(report)
                    attempts.append({"op_types": COMPUTE_OPS, "kept_float": exclude, "failures": failures})
                    console.log(f"  keeping {k} most sensitive nodes in float: {'pass' if not failures else 'fail'}")
                    if not failures:
                        break
        report["gate"] = {**req.gate.__dict__, "passed": not failures, "failures": failures}
        report["recovery"] = {
            "attempts": attempts,
            "kept_float": settings.excluded_nodes,
            "op_types": settings.op_types,
        }
        report["validated_with"] = "exact Q/DQ arithmetic" if profile.validate_exact else "this host's kernels"
        shipped, reference_file = tmp / "shipped.onnx", tmp / "reference.onnx"
        compact(candidate, shipped)
        compact(prep.path, reference_file)  # the fp32 baseline gets the same treatment
        ref_size, cand_size = reference_file.stat().st_size, shipped.stat().st_size
        ref_gz, cand_gz = (len(gzip.compress(p.read_bytes(), 6)) for p in (reference_file, shipped))
        report["size"] = {
            "reference_bytes": ref_size,
            "candidate_bytes": cand_size,
            "ratio": ref_size / cand_size,
            "reference_gzip_bytes": ref_gz,
            "candidate_gzip_bytes": cand_gz,
            "gzip_ratio": ref_gz / cand_gz,
        }
        if failures:
            raise PackError("accuracy gate failed: " + "; ".join(failures) + " (no bundle written)", report)

        console.log("measuring latency (1 thread, batch 1 and 8)")
        report["latency_ms"] = {
            label: {f"batch{b}": latency_ms(session(path, 1), evals, b) for b in (1, 8)}
            for label, path in (("reference", prep.path), ("candidate", candidate))
        }
        batching = batching_of(prep.inputs, prep.outputs, req.stateful)
        if profile.batch_profile and batching["batchable"]:
            batching["profile"] = profile.batch_profile
        fields: dict[str, Any] = {
            "name": req.name,
            "version": req.version,
            "target": profile.name,
            "runtime": profile.runtime,
            "model": "model.onnx",
            "inputs": [i.model_dump() for i in prep.inputs],
            "outputs": [o.model_dump() for o in prep.outputs],
            "preprocess": req.preprocess.model_dump() if req.preprocess else None,
            "labels": req.labels,
            "precision": req.precision,
            "quantization": {**settings.as_manifest(), "preparation": prep.notes, "ops": prep.ops},
            "validation": report,
            "runtime_options": {"providers": profile.providers, "provider_options": _provider_options(profile, req)},
            "batching": batching,
            "source_sha256": hashlib.sha256(source_bytes).hexdigest(),
            "key_id": "",
        }
        files: dict[str, bytes] = {"model.onnx": shipped.read_bytes()}
        if req.preprocess is None:
            # No image spec to build a warm-up tensor from (audio, state, scalars such as
            # silero's sample rate): ship a real held-out sample to warm up with.
            warmup = io.BytesIO()
            np.savez(warmup, **evals[0].feeds)  # type: ignore[arg-type]
            files["warmup.npz"] = warmup.getvalue()
            batching["warmup"] = "warmup.npz"
        draft = BundleManifest.model_validate({**fields, "files": [], "created": "now"})
        out = req.out or Path(cwd) / draft.filename
        files["report.md"] = render_report(draft, report).encode()
        manifest = write_bundle(out, fields, files, key)
        console.log(f"wrote {out} ({out.stat().st_size} bytes, signed by key {manifest.key_id})")
        return PackResult(out, manifest, report)


def _progress(console: Console) -> Progress | None:
    if console.quiet:
        return None
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _provider_options(profile: Any, req: PackRequest) -> dict[str, dict[str, Any]]:
    """The target's provider options for this artifact: TensorRT's INT8 mode only for a Q/DQ
    INT8 graph (an FP16 variant without Q/DQ would make TensorRT ask for a calibration table)."""
    options = {k: dict(v) for k, v in profile.provider_options.items()}
    trt = options.get("TensorrtExecutionProvider")
    if trt is not None and req.precision != "int8":
        trt["trt_int8_enable"] = False
        trt["trt_fp16_enable"] = req.precision == "fp16"
    return options
