"""Apply a bundle's PreprocessSpec to an image.

The packager calibrates and validates through this function and the daemon runs it on every
sensor frame, so the model sees on the device exactly what it was calibrated on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.contracts.bundle import PreprocessSpec

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

_INTERP = {"linear": 1, "area": 3, "cubic": 2, "lanczos": 4, "nearest": 0}  # cv2.INTER_* values


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - exercised on a device without the extra
        raise RuntimeError("image preprocessing needs OpenCV: pip install 'edge-runtime[sources]'") from e
    return cv2


def read_image(path: Path) -> np.ndarray:
    """Read an image file as BGR uint8 (what OpenCV captures give too)."""
    cv2 = _cv2()
    data = np.fromfile(str(path), dtype=np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise ValueError(f"{path}: not a readable image (expected {', '.join(IMAGE_SUFFIXES)})")
    return np.asarray(img)


def decode_image(data: bytes) -> np.ndarray:
    cv2 = _cv2()
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise ValueError("payload is not a decodable image (jpg/png/bmp/webp)")
    return np.asarray(img)


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """BGR uint8 HxWx3 image -> one model input sample (no batch axis)."""
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {list(image.shape)} ({image.dtype})")
    cv2 = _cv2()
    image = image[:, :, :3]
    w, h = spec.size
    interp = _INTERP[spec.interpolation]
    ih, iw = image.shape[:2]
    pad_mask: tuple[int, int, int, int] | None = None  # y0, y1, x0, x1 of the real content
    if spec.resize == "stretch":
        out = cv2.resize(image, (w, h), interpolation=interp)
    elif spec.resize == "center_crop":
        short = spec.resize_short or min(w, h)
        r = short / min(iw, ih)
        rw, rh = max(w, int(round(iw * r))), max(h, int(round(ih * r)))
        resized = cv2.resize(image, (rw, rh), interpolation=interp)
        y0, x0 = (rh - h) // 2, (rw - w) // 2
        out = resized[y0 : y0 + h, x0 : x0 + w]
    else:  # letterbox (centered) or pad (top-left, PP-OCR style), both keep the aspect ratio
        r = min(w / iw, h / ih)
        rw, rh = max(1, min(w, int(round(iw * r)))), max(1, min(h, int(round(ih * r))))
        resized = cv2.resize(image, (rw, rh), interpolation=interp)
        y0, x0 = ((h - rh) // 2, (w - rw) // 2) if spec.resize == "letterbox" else (0, 0)
        out = np.zeros((h, w, 3), np.uint8)
        out[y0 : y0 + rh, x0 : x0 + rw] = resized
        pad_mask = (y0, y0 + rh, x0, x0 + rw)
    if spec.color == "rgb":
        out = out[:, :, ::-1]
    if spec.dtype in ("uint8", "int8"):
        arr = out.astype(np.int16) - 128 if spec.dtype == "int8" else out
        result = np.ascontiguousarray(arr.astype(spec.dtype))
    else:
        x = out.astype(np.float32) * np.float32(spec.scale)
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        if pad_mask is not None:
            y0, y1, x0, x1 = pad_mask
            filled = np.full_like(x, spec.pad_value)
            filled[y0:y1, x0:x1] = x[y0:y1, x0:x1]
            x = filled
        result = x.astype(spec.dtype)
    if spec.layout == "nchw":
        result = result.transpose(2, 0, 1)
    return np.ascontiguousarray(result)
