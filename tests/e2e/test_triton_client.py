"""An existing client of the Open Inference Protocol works unchanged: NVIDIA's tritonclient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import Daemon

pytestmark = pytest.mark.e2e

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")


@pytest.fixture(scope="module")
def daemon(installed_state: Path) -> object:
    d = Daemon(installed_state)
    yield d
    assert d.stop() == 0


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_infer(daemon: Daemon, binary: bool) -> None:
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{daemon.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("orientation")
        meta = client.get_model_metadata("orientation")
        assert meta["inputs"][0]["name"] == "x" and meta["inputs"][0]["datatype"] == "FP32"
        x = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("fetch_name_0", binary_data=binary)
        result = client.infer("orientation", [inp], outputs=[out])
        y = result.as_numpy("fetch_name_0")
        assert y.shape == (2, 4) and y.dtype == np.float32 and np.isfinite(y).all()
        assert result.get_response()["model_version"] == "1.0.0"
    finally:
        client.close()


def test_tritonclient_error_is_readable(daemon: Daemon) -> None:
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{daemon.port}")
    try:
        inp = httpclient.InferInput("x", [1, 3, 10, 10], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3, 10, 10), np.float32))
        with pytest.raises(Exception, match=r"expects shape \[N,3,224,224\]"):
            client.infer("orientation", [inp])
    finally:
        client.close()
