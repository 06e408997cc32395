"""Real images with known labels, rendered with OpenCV, for calibration, evaluation and demos.

Random tensors are not calibration data (MODELS.md saw a detector drop to cosine 0.14 with
them). These are actual text pages and text lines, drawn with OpenCV's fonts and rotated
by known angles, written as PNG files in the ImageFolder layout (``DIR/<label>/*.png``) that
``edgert pack --eval`` reads ground truth from. Different seeds give different images, so a
calibration set and an evaluation set never share a picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "edge",
    "runtime",
    "model",
    "device",
    "fleet",
    "sensor",
    "frame",
    "batch",
    "quantize",
    "signal",
    "report",
    "invoice",
    "total",
    "amount",
    "date",
    "page",
    "number",
    "section",
    "chapter",
    "figure",
    "table",
    "result",
    "value",
    "order",
    "customer",
    "address",
    "station",
    "meter",
    "reading",
    "voltage",
    "current",
    "status",
    "update",
]
_ROTATIONS = {"0": None, "90": 0, "180": 1, "270": 2}  # cv2.ROTATE_90_CLOCKWISE=0, 180=1, CCW=2


def _cv2():  # type: ignore[no-untyped-def]
    import cv2

    return cv2


def text_page(rng: np.random.Generator, width: int = 600, height: int = 800) -> np.ndarray:
    cv2 = _cv2()
    fonts = [0, 2, 3, 4, 1]  # HERSHEY simplex, duplex, complex, triplex, plain
    img = np.full((height, width, 3), int(rng.integers(225, 256)), np.uint8)
    font = fonts[int(rng.integers(len(fonts)))]
    size = float(rng.uniform(0.6, 1.1))
    thickness = int(rng.integers(1, 3))
    y = int(rng.integers(30, 60))
    step = int(30 * size) + int(rng.integers(6, 16))
    while y < height - 20:
        line = " ".join(rng.choice(WORDS, int(rng.integers(3, 9))))
        ink = int(rng.integers(0, 70))
        cv2.putText(img, line, (int(rng.integers(20, 50)), y), font, size, (ink, ink, ink), thickness, 16)
        y += step
    return img


def text_line(rng: np.random.Generator) -> np.ndarray:
    cv2 = _cv2()
    words = " ".join(rng.choice(WORDS, int(rng.integers(2, 5))))
    font = int(rng.choice([0, 2, 3, 4]))
    size = float(rng.uniform(0.9, 1.4))
    (tw, th), base = cv2.getTextSize(words, font, size, 2)
    bg = int(rng.integers(200, 256))
    img = np.full((th + base + 16, tw + 16, 3), bg, np.uint8)
    ink = int(rng.integers(0, 80))
    cv2.putText(img, words, (8, th + 8), font, size, (ink, ink, ink), int(rng.integers(1, 3)), 16)
    return img


def rotate(img: np.ndarray, label: str) -> np.ndarray:
    code = _ROTATIONS[label]
    return img if code is None else _cv2().rotate(img, code)


def write_orientation_set(out: Path, count: int, seed: int) -> Path:
    """Pages rotated 0/90/180/270 clockwise, ``count`` in all, balanced across labels."""
    rng = np.random.default_rng(seed)
    labels = list(_ROTATIONS)
    for i in range(count):
        label = labels[i % 4]
        _write(out / label / f"page-{seed}-{i:04d}.png", rotate(text_page(rng), label))
    return out


def write_textline_set(out: Path, count: int, seed: int) -> Path:
    """Text lines upright (``0``) or upside down (``180``), balanced."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = ("0", "180")[i % 2]
        _write(out / label / f"line-{seed}-{i:04d}.png", rotate(text_line(rng), label))
    return out


def write_page_set(out: Path, count: int, seed: int) -> Path:
    """Upright pages without labels (for the text detector)."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        _write(out / f"page-{seed}-{i:04d}.png", text_page(rng, 480, 480))
    return out


def _write(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not _cv2().imwrite(str(path), img):
        raise OSError(f"could not write {path}")
