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


def _converter(kind: str, source: Path, tf: Any) -> tuple[Any, list[str]]:
    if kind == "keras":
        import keras

        model = keras.models.load_model(source, safe_mode=True)  # no Lambda/pickled code is ever run
        specs = [tf.TensorSpec([1, *i.shape[1:]], i.dtype, name=i.name.split(":")[0]) for i in model.inputs]

        @tf.function(input_signature=specs)
        def serve(*xs: Any) -> Any:
            return model(list(xs) if len(xs) > 1 else xs[0], training=False)

        fn = serve.get_concrete_function()
        return tf.lite.TFLiteConverter.from_concrete_functions([fn], model), [s.name for s in specs]
    loaded = tf.saved_model.load(str(source))
    sig = loaded.signatures["serving_default"]
    names = list(sig.structured_input_signature[1].keys())
    return tf.lite.TFLiteConverter.from_saved_model(str(source)), names


def _details(content: bytes, tf: Any) -> dict[str, Any]:
    it = tf.lite.Interpreter(model_content=content)

    def d(x: dict[str, Any]) -> dict[str, Any]:
        return {"name": x["name"], "shape": [int(v) for v in x["shape_signature"]], "dtype": x["dtype"].__name__,
                "quantization": [float(x["quantization"][0]), int(x["quantization"][1])]}  # fmt: skip

    return {"inputs": [d(x) for x in it.get_input_details()], "outputs": [d(x) for x in it.get_output_details()]}


def main() -> None:
    req = json.loads(Path(sys.argv[1]).read_text())
    import numpy as np
    import tensorflow as tf

    source, workdir = Path(req["source"]), Path(req["workdir"])
    log = ""
    kind = req["kind"]
    if req.get("probe"):  # the source's inputs, to load calibration data for them
        if kind == "keras":
            import keras

            model = keras.models.load_model(source, safe_mode=True)
            inputs = [{"name": i.name.split(":")[0], "shape": [d or -1 for d in i.shape], "dtype": i.dtype}
                      for i in model.inputs]  # fmt: skip
        else:
            sig = tf.saved_model.load(str(source)).signatures["serving_default"]
            inputs = [{"name": k, "shape": [d or -1 for d in v.shape.as_list()], "dtype": v.dtype.name}
                      for k, v in sig.structured_input_signature[1].items()]  # fmt: skip
        print(json.dumps({"inputs": inputs}))
        return
    if kind == "onnx":
        source, log = _saved_model_from_onnx(source, workdir)
        kind = "saved_model"
    calib = dict(np.load(req["calib"], allow_pickle=False))

    conv, names = _converter(kind, source, tf)
    Path(req["out_float"]).write_bytes(conv.convert())

    conv, names = _converter(kind, source, tf)
    missing = [n for n in names if n not in calib]
    if missing:
        raise SystemExit(f"calibration data has no arrays for inputs {missing} (has {sorted(calib)})")
    n = len(next(iter(calib.values())))

    def representative() -> Any:
        for i in range(n):
            if kind == "keras":
                yield [calib[k][i : i + 1] for k in names]
            else:
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
