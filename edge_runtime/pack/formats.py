"""What a model source is, told from its content (a file name's suffix is a hint people get wrong:
`model.bin`, `model` or `export.pb` can each be an ONNX file)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def model_format(path: Path) -> str:
    """ "onnx", "keras", "saved_model" or "tflite"; ValueError naming what was expected otherwise."""
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return "saved_model"
        raise ValueError(f"{path} is a folder without saved_model.pb; expected an ONNX or .keras file or a SavedModel")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ValueError(f"cannot read model {path}: {e.strerror or e}") from None
    if head[:4] == b"PK\x03\x04" or head[:4] == b"\x89HDF":
        return "keras"  # a .keras archive (zip) or a legacy HDF5 model
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[:1] == b"\x08" and len(head) > 1:  # protobuf field 1 (ir_version), how every ONNX model starts
        return "onnx"
    raise ValueError(
        f"{path} is not a model this packer reads: expected ONNX (.onnx), Keras (.keras) or a SavedModel folder"
    )


def source_sha256(path: Path) -> str:
    """The sha256 of a model source: of the file, or, for a folder (a SavedModel), of every file in
    it, each named by its relative path, in sorted order (so a changed variable file changes it)."""
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()
