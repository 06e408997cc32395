"""Calibration and evaluation data: folders of images, .npy arrays or .npz files.

Images go through the bundle's PreprocessSpec, exactly as on the device. Ground truth for
task accuracy comes from the ImageFolder layout (``DIR/<label>/...``) or from a
``labels.csv`` (``file,label``) at the folder's root.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.contracts.bundle import PreprocessSpec, TensorSpec
from edge_runtime.serving.preprocess import IMAGE_SUFFIXES, preprocess, read_image

DATA_SUFFIXES = (*IMAGE_SUFFIXES, ".npy", ".npz")


class DatasetError(Exception):
    pass


@dataclass
class Sample:
    feeds: dict[str, np.ndarray]  # each with a leading batch axis of 1
    source: str
    label: str | None = None


def _files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
    if not files:
        raise DatasetError(f"{root} holds no data files (expected {', '.join(DATA_SUFFIXES)})")
    return files


def _truth(root: Path, files: list[Path]) -> dict[Path, str]:
    table = root / "labels.csv"
    if table.exists():
        with open(table, newline="") as f:
            return {root / row[0]: row[1].strip() for row in csv.reader(f) if len(row) >= 2}
    return {p: p.parent.name for p in files if p.parent != root}


def _add_batch(arr: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if arr.ndim == len(spec.shape) - 1:
        return arr[None]
    if arr.ndim == len(spec.shape):
        return arr  # already batched (or a state tensor whose batch axis is not axis 0)
    raise DatasetError(
        f"input {spec.name!r} expects rank {len(spec.shape)} {spec.shape}, got array of shape {list(arr.shape)}"
    )


def load_samples(
    root: Path,
    inputs: list[TensorSpec],
    spec: PreprocessSpec | None,
    limit: int | None = None,
) -> list[Sample]:
    files = _files(root)
    if limit:
        files = files[:limit]
    truth = _truth(root, files)
    samples = []
    for path in files:
        suffix = path.suffix.lower()
        feeds: dict[str, np.ndarray]
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                missing = [i.name for i in inputs if i.name not in z.files]
                if missing:
                    raise DatasetError(f"{path} lacks inputs {missing}; it holds {z.files}")
                feeds = {i.name: _add_batch(np.asarray(z[i.name]), i) for i in inputs}
        else:
            if len(inputs) != 1:
                names = [i.name for i in inputs]
                raise DatasetError(
                    f"the model has {len(inputs)} inputs {names}: give .npz files keyed by input name, not {path.name}"
                )
            if suffix == ".npy":
                arr = np.load(path, allow_pickle=False)
            else:
                if spec is None:
                    raise DatasetError(f"{path.name} is an image, and images need preprocessing: {_hint(inputs[0])}")
                arr = preprocess(read_image(path), spec)
            feeds = {inputs[0].name: _add_batch(arr, inputs[0])}
        for i in inputs:
            want = np.dtype(i.dtype)
            if feeds[i.name].dtype != want:
                feeds[i.name] = feeds[i.name].astype(want)
            _check_shape(path, i, feeds[i.name])
        samples.append(Sample(feeds, str(path.relative_to(root)), truth.get(path)))
    return samples


def _hint(spec: TensorSpec) -> str:
    """What to pass, guessed from the model's input shape (NCHW or NHWC with 1 or 3 channels)."""
    shape = spec.shape
    base = (
        "pass --size WxH (and --layout/--color/--scale/--mean/--std as the model was trained) or --preprocess FILE.json"
    )
    if len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape[1:]):
        c, h, w = shape[1], shape[2], shape[3]
        if c in (1, 3):
            return f"the model's input {spec.name!r} is [N,{c},{h},{w}]: try --size {w}x{h} --layout nchw; {base}"
        h, w, c = shape[1], shape[2], shape[3]
        if c in (1, 3):
            return f"the model's input {spec.name!r} is [N,{h},{w},{c}]: try --size {w}x{h} --layout nhwc; {base}"
    return base


def _check_shape(path: Path, spec: TensorSpec, arr: np.ndarray) -> None:
    """A sample must fit the model's input: said here, with both shapes, rather than by the runtime."""
    dims = ",".join("N" if isinstance(d, str) or d < 0 else str(d) for d in spec.shape)
    fits = arr.ndim == len(spec.shape) and all(
        isinstance(w, str) or w < 0 or w == h for w, h in zip(spec.shape, arr.shape, strict=True)
    )
    if not fits:
        raise DatasetError(
            f"{path.name}: sample of shape [{','.join(map(str, arr.shape))}] does not fit the model's input "
            f"{spec.name!r} of shape [{dims}]"
        )


class SampleReader:
    """onnxruntime.quantization CalibrationDataReader over samples, with a progress hook."""

    def __init__(self, samples: list[Sample], on_next: Any = None) -> None:
        self._samples = samples
        self._it: Iterator[Sample] = iter(samples)
        self._on_next = on_next

    def get_next(self) -> dict[str, np.ndarray] | None:
        s = next(self._it, None)
        if s is None:
            return None
        if self._on_next:
            self._on_next()
        return s.feeds

    def rewind(self) -> None:
        self._it = iter(self._samples)

    def __len__(self) -> int:
        return len(self._samples)
