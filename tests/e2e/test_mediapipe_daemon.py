"""The MediaPipe TFLite models from their wheel (selfie segmentation with its custom op, BlazeFace,
face mesh, palm detection) installed as bundles and served together by a real `edgert serve`
process through its LiteRT backend, answered over HTTP from a real rendered image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.bundle import PreprocessSpec, load_private_key, sha256_bytes, write_bundle
from edge_runtime.contracts.client import Client
from edge_runtime.pack import samples, zoo
from edge_runtime.serving.preprocess import preprocess, read_image
from tests.conftest import Daemon, edgert

pytestmark = pytest.mark.e2e

MODELS = {"selfie-segmentation": "selfie", "face-detection": "face", "face-landmark": "face-mesh",
          "palm-detection": "palm"}  # fmt: skip


def tflite_bundle(key: str, name: str, out: Path, signing_key: Path) -> Path:
    from ai_edge_litert.interpreter import Interpreter

    model = zoo.fetch(key).read_bytes()
    it = Interpreter(model_content=model)

    def specs(details: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{"name": d["name"], "dtype": "float32", "shape": [int(v) for v in d["shape"]]} for d in details]  # type: ignore[attr-defined]

    write_bundle(
        out,
        {"name": name, "version": "1.0.0", "target": "arm64-cpu", "runtime": "litert", "model": "model.tflite",
         "inputs": specs(it.get_input_details()), "outputs": specs(it.get_output_details()),
         "preprocess": zoo.RECIPES[key].preprocess, "precision": "fp16",
         "batching": {"max_batch": 1, "batchable": False, "reason": "fixed batch 1"},
         "source_sha256": sha256_bytes(model), "key_id": ""},
        {"model.tflite": model}, load_private_key(signing_key),
    )  # fmt: skip
    return out


def test_mediapipe_models_are_served_by_the_daemon(keys: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    for key, name in MODELS.items():
        b = tflite_bundle(key, name, tmp_path / f"{name}.edgepkg", keys / "signing.key")
        edgert("install", str(b), "--state-dir", str(state), "--trust", str(keys / "signing.pub"),
               "--target", "arm64-cpu", check=True)  # fmt: skip
    page = samples.write_orientation_set(tmp_path / "img", 4, seed=5)
    image = read_image(next(iter((page / "0").iterdir())))
    # Configured for an NPU this machine does not have: every model falls back to XNNPACK and serves.
    daemon = Daemon(state, "--delegate", "/nonexistent/libedgetpu.so.1", "--target", "arm64-cpu")
    try:
        with Client(daemon.url) as c:
            for key, name in MODELS.items():
                x = preprocess(image, PreprocessSpec.model_validate(zoo.RECIPES[key].preprocess))[None]
                meta = c.metadata(name)
                out = c.infer(name, {meta["inputs"][0]["name"]: x})
                assert out, name
                for arr in out.values():
                    assert np.isfinite(arr).all(), name
                if name == "selfie":  # a probability mask
                    m = next(iter(out.values()))
                    assert m.shape == (1, 256, 256, 1) and float(m.min()) >= 0.0 and float(m.max()) <= 1.0
                if name == "face-mesh":
                    assert out["conv2d_21"].shape == (1, 1, 1, 1404)  # 468 landmarks x 3
        assert "falling back to XNNPACK" in daemon.output()
    finally:
        daemon.stop()
