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
                    raise DatasetError(
                        "image data needs preprocessing: pass --size WxH (and --layout/--color/--scale/"
                        "--mean/--std) or --preprocess FILE.json"
                    )
                arr = preprocess(read_image(path), spec)
            feeds = {inputs[0].name: _add_batch(arr, inputs[0])}
        for i in inputs:
            want = np.dtype(i.dtype)
            if feeds[i.name].dtype != want:
                feeds[i.name] = feeds[i.name].astype(want)
        samples.append(Sample(feeds, str(path.relative_to(root)), truth.get(path)))
    return samples


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
