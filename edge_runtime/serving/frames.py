"""Frames as the sensor gives them: a uint8 image in its own size and layout becomes the model's
input through the bundle's own preprocessing (resize, color, layout, normalisation).

A 640x480 camera frame is 0.9 MB as uint8 HWC and would be 3.7 MB as float32 after
preprocessing: the device app sends the frame and never needs to know the model's preprocessing.

Which requests are raw frames (decided from the data, no extra parameter, so unchanged clients
such as ``tritonclient`` can send them):
- the bundle declares preprocessing and the model has exactly one input;
- the array is uint8 shaped [H, W, C] (one frame) or [N, H, W, C] (N frames of one size), C in
  1, 3 or 4, in OpenCV's BGR(A) order (what cameras and ``cv2.imread`` give);
- and it is not already a model input: a uint8 model whose input has exactly this shape takes it
  as it is (already preprocessed).
"""

from __future__ import annotations

import numpy as np

from edge_runtime.contracts.bundle import BundleManifest, TensorSpec
from edge_runtime.serving.tensors import InputError

MAX_FRAME_PIXELS = 4096 * 4096  # a frame larger than this is refused before any work is done


def raw_frame_input(manifest: BundleManifest) -> TensorSpec | None:
    """The model input that accepts raw frames, or None when the bundle cannot preprocess."""
    if manifest.preprocess is None or len(manifest.inputs) != 1:
        return None
    return manifest.inputs[0]


def _matches_spec(spec: TensorSpec, arr: np.ndarray) -> bool:
    if arr.dtype != np.dtype(spec.dtype) or arr.ndim != len(spec.shape):
        return False
    return all(isinstance(w, str) or w <= 0 or w == h for w, h in zip(spec.shape, arr.shape, strict=True))


def is_raw_frame(manifest: BundleManifest, feeds: dict[str, np.ndarray]) -> bool:
    spec = raw_frame_input(manifest)
    if spec is None or len(feeds) != 1 or spec.name not in feeds:
        return False
    arr = feeds[spec.name]
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4) or arr.shape[-1] not in (1, 3, 4):
        return False
    return not _matches_spec(spec, arr)


def frames_to_input(frames: np.ndarray, manifest: BundleManifest) -> np.ndarray:
    """[H,W,C] or [N,H,W,C] uint8 frames -> the model's input batch, by the bundle's preprocessing."""
    from edge_runtime.serving.preprocess import preprocess

    pre = manifest.preprocess
    assert pre is not None
    batch = frames[None] if frames.ndim == 3 else frames
    n, h, w, c = batch.shape
    if not n or not h or not w:
        raise InputError(f"raw frame of shape {list(frames.shape)} is empty; expected [H,W,C] or [N,H,W,C] uint8")
    if h * w > MAX_FRAME_PIXELS:
        raise InputError(f"raw frame of {w}x{h} pixels exceeds the limit of {MAX_FRAME_PIXELS} pixels")
    try:
        rows = [preprocess(img if c != 1 else img[:, :, 0], pre) for img in batch]
    except ValueError as e:
        raise InputError(f"raw frame of shape {list(frames.shape)} cannot be preprocessed: {e}") from e
    return np.stack(rows) if len(rows) > 1 else rows[0][None]
