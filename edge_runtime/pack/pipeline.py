"""`edgert pack`: check the request, then hand it to the flow of the artifact it asks for.

    onnx    prepare -> calibrate/quantize -> validate -> gate (-> recover) -> sign -> bundle
    tflite  convert (TensorFlow, isolated) -> validate on LiteRT -> gate -> sign -> bundle

Artifact flows are chosen through a registry ("module:function", imported only when chosen);
both share their start and end (flow.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import tempfile
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from edge_runtime.contracts.bundle import check_name, check_version, load_private_key
from edge_runtime.pack.formats import model_format
from edge_runtime.pack.request import PackError, PackRequest, PackResult, batching_of
from edge_runtime.pack.targets import TargetProfile, get_target

ArtifactFlow = Callable[[PackRequest, TargetProfile, Path, Console, Path], PackResult]
ARTIFACTS: dict[str, str] = {
    "onnx": "edge_runtime.pack.onnx_pack:pack_onnx",
    "tflite": "edge_runtime.pack.tflite_pack:pack_tflite",
}

__all__ = ["ARTIFACTS", "PackError", "PackRequest", "PackResult", "batching_of", "pack"]


def _flow(artifact: str) -> ArtifactFlow:
    module, _, attr = ARTIFACTS[artifact].partition(":")
    fn: ArtifactFlow = getattr(importlib.import_module(module), attr)
    return fn


def pack(req: PackRequest, console: Console | None = None) -> PackResult:
    console = console or Console(stderr=True, quiet=True)
    profile = get_target(req.target)
    artifact = req.artifact or profile.artifact
    if artifact not in profile.all_artifacts:
        raise PackError(f"target {profile.name} ships {' or '.join(profile.all_artifacts)} artifacts, not {artifact}")
    # Everything that can be refused without work is refused first (name, version, source, key, data).
    check_name(req.name)
    check_version(req.version)
    kind = model_format(req.model)
    if kind == "tflite":
        raise PackError(f"{req.model} is already a TFLite model; pack its source (ONNX, Keras or SavedModel)")
    if artifact == "onnx" and kind != "onnx":
        raise PackError(f"{req.model} is a {kind} model: ONNX artifacts are built from ONNX models; Keras and "
                        "SavedModel sources convert to TFLite (--artifact tflite, or --target npu)")  # fmt: skip
    load_private_key(req.key)  # refuse a bad key before minutes of work
    for what, folder in (("--calib", req.calib), ("--eval", req.eval)):
        if not folder.is_dir():
            raise PackError(f"{what} {folder} is not a folder; expected a folder of images, .npy or .npz samples")
        if not any(p.is_file() for p in folder.rglob("*")):
            raise PackError(f"{what} {folder} is empty; expected images, .npy or .npz samples")
    # ONNX Runtime's shape inference writes scratch files (sym_shape_infer_temp.onnx, <uuid>.data
    # of several MB) into the working directory: work inside our temporary directory, with every
    # path of the request made absolute first.
    cwd = Path.cwd()
    req = dataclasses.replace(
        req, model=req.model.resolve(), calib=req.calib.resolve(), eval=req.eval.resolve(),
        key=req.key.resolve(), out=req.out.resolve() if req.out else None,
    )  # fmt: skip
    if req.precision == "auto":
        from edge_runtime.pack.auto import pack_auto

        return pack_auto(req, profile, artifact, lambda r: _run(r, artifact, console, cwd), console)
    return _run(req, artifact, console, cwd)


def _run(req: PackRequest, artifact: str, console: Console, cwd: Path) -> PackResult:
    profile = get_target(req.target)
    flow = _flow(artifact)
    with tempfile.TemporaryDirectory(prefix="edgert-pack-") as tmp_s, contextlib.chdir(tmp_s):
        try:
            return flow(req, profile, Path(tmp_s), console, cwd)
        except PackError:
            raise
        except (RuntimeError, ValueError, OSError) as e:
            if artifact == "onnx":
                raise
            raise PackError(str(e)) from e
