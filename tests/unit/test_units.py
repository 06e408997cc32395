"""Small pieces: metrics text, config errors, OIP codec, preprocessing, input checks, providers."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.bundle import PreprocessSpec, TensorSpec
from edge_runtime.contracts.oip import ProtocolError, decode_request, decode_response, encode_request, encode_response
from edge_runtime.device.config import ConfigError, load_config
from edge_runtime.serving.metrics import Registry
from edge_runtime.serving.preprocess import preprocess
from edge_runtime.serving.tensors import InputError, check_inputs

pytestmark = pytest.mark.unit


def test_metrics_text_format() -> None:
    r = Registry()
    c = r.counter("a_total", "things", ("model",))
    h = r.histogram("lat_seconds", "latency", ("model",), (0.1, 1.0))
    c.inc(model='we"ird')
    h.observe(0.05, model="m")
    h.observe(5, model="m")
    text = r.render()
    assert 'a_total{model="we\\"ird"} 1' in text
    assert 'lat_seconds_bucket{model="m",le="0.1"} 1' in text
    assert 'lat_seconds_bucket{model="m",le="+Inf"} 2' in text
    assert 'lat_seconds_count{model="m"} 2' in text and "# TYPE lat_seconds histogram" in text


def test_config_errors_name_key_and_line(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("port: 80\nbatching:\n  max_batch: 0\nsources:\n  - {name: a, model: m, kind: webcam, uri: '0'}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "batching.max_batch (line 3)" in str(e.value) and "sources.0.kind" in str(e.value)
    f.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    f.write_text("port: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_config(f)


def test_config_defaults_and_overrides() -> None:
    c = load_config(None, {"port": 9000, "batching.max_batch": 4, "host": None})
    assert c.port == 9000 and c.batching.max_batch == 4 and c.host == "127.0.0.1"


def test_oip_roundtrip_binary_and_json() -> None:
    feeds = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64)}
    for binary in (True, False):
        body, hl = encode_request(feeds, binary=binary)
        req, got = decode_request(body, hl)
        for k in feeds:
            np.testing.assert_array_equal(got[k], feeds[k])
        out_body, out_hl = encode_response("m", "1", req, {"y": feeds["a"] * 2})
        np.testing.assert_array_equal(decode_response(out_body, out_hl)["y"], feeds["a"] * 2)
        assert (out_hl is not None) == binary


@pytest.mark.parametrize(
    "body,msg",
    [
        (b'{"inputs":[{"name":"a","shape":[2],"datatype":"FP32","data":[1,2,3]}]}', "3 values given"),
        (b'{"inputs":[{"name":"a","shape":[-1],"datatype":"FP32","data":[1]}]}', "non-negative"),
        (b'{"inputs":[{"name":"a","shape":[1],"datatype":"FP32","data":["x"]}]}', "not FP32"),
        (b'{"inputs":[{"name":"a","shape":[1],"datatype":"FP32"}]}', "no 'data'"),
        (b'{"inputs":"a"}', "non-empty 'inputs'"),
        (b"[1,2]", "non-empty 'inputs'"),
    ],
)
def test_oip_rejects(body: bytes, msg: str) -> None:
    with pytest.raises(ProtocolError, match=msg):
        decode_request(body, None)


def test_oip_rejects_trailing_binary() -> None:
    body, hl = encode_request({"a": np.zeros(2, np.float32)})
    with pytest.raises(ProtocolError, match="trailing binary"):
        decode_request(body + b"xx", hl)


def test_preprocess_layouts() -> None:
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :, 2] = 255  # red in BGR
    spec = PreprocessSpec(size=(64, 32), resize="letterbox", layout="nchw", color="rgb", scale=1 / 255, pad_value=-1)
    x = preprocess(img, spec)
    assert x.shape == (3, 32, 64) and x.dtype == np.float32
    assert x[0, 16, 32] == pytest.approx(1.0) and x[2, 16, 32] == 0.0  # channel 0 is red after BGR->RGB
    assert x[0, 0, 0] == pytest.approx(1.0)  # 200x100 into 64x32 fills exactly: no padding rows
    pad = preprocess(np.zeros((100, 100, 3), np.uint8), spec)
    assert pad[0, 16, 0] == -1.0  # letterbox padding carries pad_value
    nhwc = preprocess(img, PreprocessSpec(size=(16, 16), layout="nhwc", dtype="uint8"))
    assert nhwc.shape == (16, 16, 3) and nhwc.dtype == np.uint8
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        preprocess(np.zeros((4, 4, 3), np.float32), spec)


def test_check_inputs_messages() -> None:
    specs = [TensorSpec(name="x", dtype="float32", shape=["N", 3]), TensorSpec(name="m", dtype="int64", shape=["N"])]
    ok = {"x": np.zeros((2, 3), np.float32), "m": np.zeros(2, np.int64)}
    assert check_inputs(specs, ok) == 2
    with pytest.raises(InputError, match="disagree on the batch size"):
        check_inputs(specs, {**ok, "m": np.zeros(3, np.int64)})
    with pytest.raises(InputError, match=r"expects shape \[N,3\] \(float32\), got \[2,4\]"):
        check_inputs(specs, {**ok, "x": np.zeros((2, 4), np.float32)})
    with pytest.raises(InputError, match="empty axis"):
        check_inputs(specs, {"x": np.zeros((0, 3), np.float32), "m": np.zeros(0, np.int64)})


def test_missing_gpu_providers_fall_back_to_cpu(caplog: pytest.LogCaptureFixture) -> None:
    from edge_runtime.backends import BackendOptions, create_backend
    from edge_runtime.pack import zoo

    caplog.set_level(logging.WARNING)
    model = zoo.fetch("ppocr-cls").read_bytes()
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    b = create_backend("onnxruntime", model, BackendOptions(providers=providers))
    assert b.active_providers == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not available" in caplog.text
    out = b.run({"x": np.zeros((1, 3, 48, 192), np.float32)})
    assert out[0].shape == (1, 2)


def test_oip_keeps_scalars_scalar() -> None:
    body, hl = encode_request({"sr": np.array(16000, np.int64)})
    _, got = decode_request(body, hl)
    assert got["sr"].shape == () and int(got["sr"]) == 16000


def test_instances_default_from_the_bundle_and_the_cores() -> None:
    from edge_runtime.contracts.bundle import BatchingSpec
    from edge_runtime.serving.batcher import BatchSettings
    from edge_runtime.serving.handles import batch_settings_for

    class Manifest:  # only what batch_settings_for reads
        def __init__(self, **batching: object) -> None:
            self.batching = BatchingSpec(**batching)  # type: ignore[arg-type]

    auto = BatchSettings(instances=0)
    plain = Manifest(max_batch=0, batchable=True)
    stateful = Manifest(max_batch=1, batchable=False, stateful=True, reason="declared stateful")
    assert batch_settings_for(plain, auto, cores=2).instances == 1  # type: ignore[arg-type]
    assert batch_settings_for(plain, auto, cores=8).instances == 4  # type: ignore[arg-type]
    assert batch_settings_for(stateful, auto, cores=8).instances == 1  # type: ignore[arg-type]
    # A number in the configuration is taken as it is, stateful or not.
    assert batch_settings_for(stateful, BatchSettings(instances=3), cores=8).instances == 3  # type: ignore[arg-type]
    assert batch_settings_for(plain, BatchSettings(instances=2), cores=2).instances == 2  # type: ignore[arg-type]
