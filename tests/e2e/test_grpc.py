"""The v2 protocol over gRPC: `tritonclient.grpc`, unchanged, against a real daemon; the same
answers and the same errors as over HTTP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.client import Client, ClientError
from tests.conftest import Daemon, free_port

pytestmark = pytest.mark.e2e
grpcclient = pytest.importorskip("tritonclient.grpc", reason="the dev extra installs tritonclient[grpc]")

X = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)


@pytest.fixture(scope="module")
def daemon(installed_state: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    cfg = tmp_path_factory.mktemp("grpc") / "edgert.yaml"
    cfg.write_text("max_body_bytes: 4000000\n")
    d = Daemon(installed_state, "--grpc-port", str(free_port()), "--config", str(cfg))
    text = d.output()
    d.grpc = text.split("grpc://")[1].split()[0].rstrip(",")  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0


def _input(name: str, arr: np.ndarray, datatype: str = "FP32") -> object:
    i = grpcclient.InferInput(name, list(arr.shape), datatype)
    i.set_data_from_numpy(arr)
    return i


def test_tritonclient_grpc_infers_as_http_does(daemon: Daemon) -> None:
    c = grpcclient.InferenceServerClient(daemon.grpc)  # type: ignore[attr-defined]
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("orientation")
    meta = c.get_model_metadata("orientation")
    assert meta.name == "orientation" and meta.inputs[0].name == "x" and list(meta.inputs[0].shape) == [-1, 3, 224, 224]
    result = c.infer("orientation", [_input("x", X)], outputs=[grpcclient.InferRequestedOutput("fetch_name_0")])
    got = result.as_numpy("fetch_name_0")
    want = Client(daemon.url).infer("orientation", {"x": X})["fetch_name_0"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert result.get_response().model_version == "1.0.0"
    # a raw camera frame, preprocessed by the daemon, over gRPC too
    frame = np.random.default_rng(4).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    out = c.infer("orientation", [_input("x", frame, "UINT8")]).as_numpy("fetch_name_0")
    assert out.shape == (1, 4) and np.isfinite(out).all()
    c.close()


def test_grpc_errors_are_the_http_errors(daemon: Daemon) -> None:
    c = grpcclient.InferenceServerClient(daemon.grpc)  # type: ignore[attr-defined]
    http = Client(daemon.url)
    cases = [
        ("orientation", [_input("x", X[:, :2])], None, "StatusCode.INVALID_ARGUMENT", 400),
        ("nope", [_input("x", X)], None, "StatusCode.NOT_FOUND", 404),
        ("orientation", [_input("x", X)], "no_such_output", "StatusCode.INVALID_ARGUMENT", 400),
        ("orientation", [_input("x", np.full((1, 3, 224, 224), np.nan, np.float32))], None,
         "StatusCode.INVALID_ARGUMENT", 400),
    ]  # fmt: skip
    for model, inputs, output, code, status in cases:
        outputs = [grpcclient.InferRequestedOutput(output)] if output else None
        with pytest.raises(grpcclient.InferenceServerException) as info:
            c.infer(model, inputs, outputs=outputs)
        assert info.value.status() == code, (model, info.value)
        arr = inputs[0]._raw_content  # type: ignore[attr-defined]
        shape = inputs[0].shape()  # type: ignore[attr-defined]
        feeds = {"x": np.frombuffer(arr, np.float32).reshape(shape)}
        with pytest.raises(ClientError) as http_info:
            if output:
                from edge_runtime.contracts.oip import encode_request

                body, hlen = encode_request(feeds, output_names=[output])
                status_code, _, data = http._request("POST", f"/v2/models/{model}/infer", body,
                                                     {"Inference-Header-Content-Length": str(hlen)})  # fmt: skip
                raise ClientError(status_code, data.decode())
            http.infer(model, feeds)
        assert http_info.value.status == status
        assert info.value.message() in http_info.value.message or http_info.value.message in info.value.message()
    # a message over the body limit (4 MB here): refused by size, as HTTP's 413
    big = np.zeros((8, 3, 224, 224), np.float32)  # 4.8 MB
    with pytest.raises(grpcclient.InferenceServerException) as info:
        c.infer("orientation", [_input("x", big)])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    c.close()
