"""The parts every artifact's pack shares: the start (prepare an ONNX source, load the calibration
and held-out sets, refuse overlap) and the end (gate -> report -> manifest -> sign -> write).

An artifact flow (onnx_pack.py, tflite_pack.py) does what differs between them in the middle:
quantize or convert, and run the candidate on the target's kernels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from edge_runtime.contracts.bundle import BundleManifest, TensorSpec, load_private_key, write_bundle
from edge_runtime.pack.datasets import Sample, load_samples
from edge_runtime.pack.input_stats import constant_inputs
from edge_runtime.pack.prepare import PreparedModel, PrepareError, prepare
from edge_runtime.pack.report import render_report
from edge_runtime.pack.request import PackError, PackRequest, PackResult

# Fewer held-out samples than this and the gate's figures mean little (each is a 1/N step).
MIN_EVAL = 8


def prepare_onnx(req: PackRequest, tmp: Path) -> PreparedModel:
    try:
        return prepare(req.model, tmp / "prep")
    except PrepareError as e:
        raise PackError(str(e)) from e


def _digest(samples: list[Sample]) -> set[str]:
    return {hashlib.sha256(b"".join(a.tobytes() for a in s.feeds.values())).hexdigest() for s in samples}


def load_held_out(req: PackRequest, specs: list[TensorSpec], console: Console) -> tuple[list[Sample], list[Sample]]:
    """The calibration and evaluation sets, preprocessed as the bundle will be; refused when they
    share samples (held-out data must be different images)."""
    calib = load_samples(req.calib, specs, req.preprocess, req.max_calib)
    evals = load_samples(req.eval, specs, req.preprocess, req.max_eval)
    if len(evals) < MIN_EVAL:
        raise PackError(
            f"the evaluation set has {len(evals)} samples; the gate's figures need at least {MIN_EVAL} (with "
            f"{len(evals)}, one disagreement moves top-1 agreement by {1 / max(1, len(evals)):.2f}): "
            "add held-out samples"
        )
    flat = constant_inputs(calib) if req.preprocess is not None else {}
    if flat:
        name, value = next(iter(flat.items()))
        raise PackError(
            f"every calibration value of input {name!r} is {value:g} ({len(calib)} samples: all-black or blank "
            "images?): the quantization range would be empty; calibrate on real images of what the device sees"
        )
    shared = _digest(calib) & _digest(evals)
    if shared:
        raise PackError(
            f"the evaluation set shares {len(shared)} samples with the calibration set; "
            "held-out data must be different images"
        )
    console.log(f"calibration: {len(calib)} samples from {req.calib}; evaluation: {len(evals)} from {req.eval}")
    return calib, evals


def record_gate(req: PackRequest, report: dict[str, Any], failures: list[str]) -> None:
    report["gate"] = {**req.gate.__dict__, "passed": not failures, "failures": failures}


def refuse_if_failed(report: dict[str, Any], failures: list[str]) -> None:
    if failures:
        raise PackError("accuracy gate failed: " + "; ".join(failures) + " (no bundle written)", report)


def finish(
    req: PackRequest,
    fields: dict[str, Any],
    files: dict[str, bytes],
    report: dict[str, Any],
    cwd: Path,
    console: Console,
) -> PackResult:
    """Render the report, sign and write the bundle (the gate has passed)."""
    draft = BundleManifest.model_validate({**fields, "files": [], "created": "now"})
    out = req.out or cwd / draft.filename
    files["report.md"] = render_report(draft, report).encode()
    manifest = write_bundle(out, fields, files, load_private_key(req.key))
    console.log(f"wrote {out} ({out.stat().st_size} bytes, signed by key {manifest.key_id})")
    return PackResult(out, manifest, report)


def progress_bar(console: Console) -> Progress | None:
    if console.quiet:
        return None
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
