"""Runs INSIDE the isolated TFLite tool environment (toolenv.py), as a script: imports only the
standard library, numpy and TensorFlow, never edge_runtime.

    python tflite_convert.py REQUEST.json

REQUEST: {"kind": "keras"|"saved_model"|"onnx", "source": PATH, "workdir": DIR, "calib": NPZ,
"int8_io": bool, "out_int8": PATH, "out_float": PATH}. The calibration arrays (one sample per
row of each input, already preprocessed exactly as on the device) feed TFLiteConverter's
representative dataset. Prints a JSON summary (inputs, outputs, onnx2tf log tail) on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

SAMPLE = "calibration_image_sample_data_20x128x128x3_float32.npy"


def _local_sample(calib: dict[str, Any], workdir: Path) -> None:
    """onnx2tf feeds 20 sample images (128x128 RGB in [0, 1]) through the ONNX model and its own
    conversion to check them against each other, and downloads them from GitHub unless this file
    is in its working directory. It gets our own calibration images instead: nothing is fetched."""
    import numpy as np

    images = next((a for a in calib.values() if a.ndim == 4 and a.shape[-1] == 3), None)
    if images is None:
        images = np.random.default_rng(0).uniform(0, 1, (20, 128, 128, 3))
    idx = np.arange(20) % len(images)
    h, w = images.shape[1:3]
    rows, cols = (np.arange(128) * h // 128), (np.arange(128) * w // 128)
    picked = images[idx][:, rows][:, :, cols].astype(np.float64)
    lo, hi = picked.min(), picked.max()
    np.save(workdir / SAMPLE, ((picked - lo) / (hi - lo or 1.0)).astype(np.float32))


def _saved_model_from_onnx(source: Path, workdir: Path) -> tuple[Path, str]:
    out = workdir / "saved_model"
    onnx2tf = Path(sys.executable).with_name("onnx2tf")
    # -b 1: a static batch of 1 (NPUs and XNNPACK want static shapes); -osd: signatures keyed by
    # the ONNX input names; no -oiqt: onnx2tf's own INT8 path would download a sample calibration
    # file, we quantize below with the real calibration data instead.
    cmd = [str(onnx2tf), "-i", str(source), "-o", str(out), "-b", "1", "-osd", "-n"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if proc.returncode != 0 or not (out / "saved_model.pb").exists():
        raise SystemExit(f"onnx2tf failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return out, (proc.stdout + proc.stderr)[-1500:]


def _keras_to_saved_model(source: Path, workdir: Path, tf: Any) -> Path:
    """A Keras model as a SavedModel with one static-batch-1 signature (NPUs and XNNPACK want
    static shapes; TFLite's calibrator cannot feed Keras 3 resource variables directly)."""
    import keras

    model = keras.models.load_model(source, safe_mode=True)  # no Lambda/pickled code is ever run
    specs = [tf.TensorSpec([1, *i.shape[1:]], i.dtype, name=i.name.split(":")[0]) for i in model.inputs]
    archive = keras.export.ExportArchive()
    archive.track(model)
    if len(specs) == 1:
        archive.add_endpoint("serving_default", lambda x: model(x, training=False), input_signature=specs)
    else:
        archive.add_endpoint("serving_default", lambda *xs: model(list(xs), training=False), input_signature=specs)
    out = workdir / "keras_saved_model"
    archive.write_out(str(out), verbose=False)
    return out


def _signature_inputs(source: Path, tf: Any) -> list[tuple[str, list[int], str]]:
    sig = tf.saved_model.load(str(source)).signatures["serving_default"]
    return [
        (k, [d or -1 for d in v.shape.as_list()], v.dtype.name) for k, v in sig.structured_input_signature[1].items()
    ]


def _converter(source: Path, tf: Any) -> tuple[Any, list[str]]:
    names = [n for n, _, _ in _signature_inputs(source, tf)]
    return tf.lite.TFLiteConverter.from_saved_model(str(source)), names


def _details(content: bytes, tf: Any) -> dict[str, Any]:
    it = tf.lite.Interpreter(model_content=content)

    def d(x: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": x["name"],
            "shape": [int(v) for v in x["shape_signature"]],
            "dtype": x["dtype"].__name__,
            "quantization": [float(x["quantization"][0]), int(x["quantization"][1])],
        }

    return {"inputs": [d(x) for x in it.get_input_details()], "outputs": [d(x) for x in it.get_output_details()]}


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text())
    import numpy as np
    import tensorflow as tf

    source, workdir = Path(req["source"]), Path(req["workdir"])
    log = ""
    kind = req["kind"]
    output_names: list[str] = []
    if kind == "keras":
        import keras

        output_names = list(keras.models.load_model(source, safe_mode=True).output_names)
        source, kind = _keras_to_saved_model(source, workdir, tf), "saved_model"
    if req.get("probe"):  # the source's inputs, to load calibration data for them
        inputs = [{"name": n, "shape": shape, "dtype": dtype} for n, shape, dtype in _signature_inputs(source, tf)]
        print(json.dumps({"inputs": inputs, "output_names": output_names}))
        return
    calib = dict(np.load(req["calib"], allow_pickle=False))
    if kind == "onnx":
        _local_sample(calib, workdir)
        source, log = _saved_model_from_onnx(source, workdir)
        kind = "saved_model"

    conv, names = _converter(source, tf)
    Path(req["out_float"]).write_bytes(conv.convert())

    conv, names = _converter(source, tf)
    missing = [n for n in names if n not in calib]
    if missing:
        raise SystemExit(f"calibration data has no arrays for inputs {missing} (has {sorted(calib)})")
    n = len(next(iter(calib.values())))

    def representative() -> Any:
        for i in range(n):
            yield {k: calib[k][i : i + 1] for k in names}

    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]  # full integer or fail
    if req.get("int8_io"):
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    content = conv.convert()
    Path(req["out_int8"]).write_bytes(content)
    print(json.dumps({"input_order": names, **_details(content, tf), "onnx2tf_log": log}))


if __name__ == "__main__":
    main()
