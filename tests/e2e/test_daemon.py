"""A real daemon process, real HTTP clients, concurrent load, bad input, overload, SIGTERM."""

from __future__ import annotations

import http.client
import json
import re
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.client import Client, ClientError
from tests.conftest import Daemon, edgert, wait_for

pytestmark = pytest.mark.e2e

X = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)


@pytest.fixture(scope="module")
def daemon(installed_state: Path) -> object:
    d = Daemon(installed_state, "--max-batch", "8", "--max-delay-ms", "5")
    yield d
    assert d.stop() == 0


def _raw(
    d: Daemon, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def _metric(text: str, name: str, **labels: str) -> float:
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(
        rf"^{re.escape(name)}{{{re.escape(lab)}}} (\S+)$" if lab else rf"^{re.escape(name)} (\S+)$", text, re.M
    )
    assert m, f"{name}{{{lab}}} not in metrics"
    return float(m.group(1))


def test_health_and_metadata(daemon: Daemon) -> None:
    c = Client(daemon.url)
    assert c.live() and c.ready()
    meta = c.metadata("orientation")
    assert meta["versions"] == ["1.0.0"] and meta["inputs"][0] == {
        "name": "x",
        "datatype": "FP32",
        "shape": [-1, 3, 224, 224],
    }
    assert meta["parameters"]["labels"] == ["0", "90", "180", "270"]
    assert _raw(daemon, "GET", "/v2/models/orientation/ready")[0] == 200
    assert _raw(daemon, "GET", "/v2/models/orientation/versions/1.0.0")[0] == 200
    assert _raw(daemon, "GET", "/v2/models/orientation/versions/9.9.9")[0] == 404


def test_json_and_binary_agree(daemon: Daemon) -> None:
    body = json.dumps(
        {
            "id": "r1",
            "inputs": [{"name": "x", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": X.ravel().tolist()}],
        }
    )
    status, data = _raw(
        daemon, "POST", "/v2/models/orientation/infer", body.encode(), {"Content-Type": "application/json"}
    )
    assert status == 200
    doc = json.loads(data)
    assert doc["id"] == "r1" and doc["model_version"] == "1.0.0"
    via_json = np.asarray(doc["outputs"][0]["data"], np.float32).reshape(doc["outputs"][0]["shape"])
    via_binary = Client(daemon.url).infer("orientation", X)["fetch_name_0"]
    assert via_binary.shape == (1, 4)
    np.testing.assert_allclose(via_json, via_binary, rtol=1e-6)


def test_batches_form_under_concurrency(daemon: Daemon) -> None:
    before = Client(daemon.url).metrics()
    s0 = _metric(before, "edgert_batch_size_sum", model="orientation")
    c0 = _metric(before, "edgert_batch_size_count", model="orientation")
    errors: list[Exception] = []

    def worker() -> None:
        with Client(daemon.url) as c:
            for _ in range(12):
                try:
                    c.infer("orientation", {"x": X})
                except Exception as e:
                    errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    after = Client(daemon.url).metrics()
    rows = _metric(after, "edgert_batch_size_sum", model="orientation") - s0
    batches = _metric(after, "edgert_batch_size_count", model="orientation") - c0
    assert rows == 96
    assert rows / batches > 1.0, f"mean batch size {rows / batches:.2f}"
    for name in ("edgert_queue_seconds_count", "edgert_request_seconds_count"):  # per request
        assert _metric(after, name, model="orientation") >= 96
    assert _metric(after, "edgert_compute_seconds_count", model="orientation") == _metric(
        after, "edgert_batch_size_count", model="orientation"
    )  # per batch
    assert _metric(after, "edgert_process_resident_memory_bytes") > 50e6
    assert _metric(after, "edgert_model_warmup_seconds", model="orientation", version="1.0.0") > 0


@pytest.mark.parametrize(
    "path,body,headers,status,message",
    [
        (
            "/v2/models/nope/infer",
            b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}',
            {},
            404,
            "not loaded",
        ),
        ("/v2/models/orientation/infer", b"{not json", {}, 400, "malformed JSON"),
        ("/v2/models/orientation/infer", b"", {}, 400, "empty request body"),
        ("/v2/models/orientation/infer", b'{"inputs":[]}', {}, 400, "non-empty 'inputs'"),
        (
            "/v2/models/orientation/infer",
            b'{"inputs":[{"name":"x","shape":[1,3,224,224],"datatype":"FP64","data":[0]}]}',
            {},
            400,
            "values given",
        ),
        (
            "/v2/models/orientation/infer",
            b'{"inputs":[{"name":"x","shape":[1,3],"datatype":"FP32","data":[0,0,0]}]}',
            {},
            400,
            "expects rank 4",
        ),
        (
            "/v2/models/orientation/infer",
            b'{"inputs":[{"name":"y","shape":[1],"datatype":"FP32","data":[0]}]}',
            {},
            400,
            "missing ['x']",
        ),
        (
            "/v2/models/orientation/infer",
            b'{"inputs":[{"name":"x","shape":[1,3,224,224],"datatype":"BYTES","data":[]}]}',
            {},
            400,
            "unsupported",
        ),
        (
            "/v2/models/orientation/infer",
            b'{"inputs":[{"name":"x","shape":[1,3,224,224],"datatype":"FP32","parameters":{"binary_data_size":16}}]}',
            {"Inference-Header-Content-Length": "102"},
            400,
            "binary_data_size 16 does not match",
        ),
        ("/v2/models/orientation/infer", b"{}", {"Inference-Header-Content-Length": "999"}, 400, "outside the body"),
        ("/v2/nothing", b"{}", {}, 404, "no such endpoint"),
    ],
)
def test_bad_requests(
    daemon: Daemon, path: str, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    got, data = _raw(daemon, "POST", path, body, headers)
    assert got == status, data
    assert message in json.loads(data)["error"]
    assert Client(daemon.url).ready()


def test_wrong_dtype_shape_nan(daemon: Daemon) -> None:
    c = Client(daemon.url)
    with pytest.raises(ClientError) as e:
        c.infer("orientation", {"x": X.astype(np.float64)})
    assert e.value.status == 400 and "expects dtype float32" in e.value.message
    with pytest.raises(ClientError) as e:
        c.infer("orientation", {"x": np.zeros((1, 224, 224, 3), np.float32)})
    assert e.value.status == 400 and "expects shape [N,3,224,224] (float32), got [1,224,224,3]" in e.value.message
    bad = X.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ClientError) as e:
        c.infer("orientation", {"x": bad})
    assert e.value.status == 400 and "NaN" in e.value.message
    with pytest.raises(ClientError) as e:
        c.infer("orientation", {"x": np.zeros((9, 3, 224, 224), np.float32)})
    assert e.value.status == 400 and "exceeds max batch 8" in e.value.message
    assert c.infer("orientation", X)["fetch_name_0"].shape == (1, 4)


def test_oversized_body(daemon: Daemon) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    conn.putrequest("POST", "/v2/models/orientation/infer")
    conn.putheader("Content-Length", str(1 << 40))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "exceeds the limit" in json.loads(r.read())["error"]
    conn.close()
    assert Client(daemon.url).ready()


def test_overload_is_rejected_and_counted(installed_state: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "edgert.yaml"
    cfg.write_text("batching:\n  max_batch: 1\n  max_queue: 2\n  max_delay_ms: 0\n")
    d = Daemon(installed_state, "--config", str(cfg))
    try:
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def worker() -> None:
            with Client(d.url) as c:
                for _ in range(6):
                    try:
                        c.infer("orientation", X)
                        code = 200
                    except ClientError as e:
                        code = e.status
                    with lock:
                        statuses[code] += 1

        def overload() -> None:
            threads = [threading.Thread(target=worker) for _ in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        overload()  # first round: arenas, thread stacks and buffers reach their working size
        rss_before = _metric(Client(d.url).metrics(), "edgert_process_resident_memory_bytes")
        for _ in range(3):
            overload()
        rss_after = _metric(Client(d.url).metrics(), "edgert_process_resident_memory_bytes")
        assert rss_after - rss_before < 30e6, f"RSS grew {(rss_after - rss_before) / 1e6:.1f} MB under overload"
        assert statuses[429] > 0 and statuses[200] > 0 and set(statuses) <= {200, 429}, statuses
        text = Client(d.url).metrics()
        assert (
            _metric(text, "edgert_requests_rejected_total", model="orientation", reason="queue_full") == statuses[429]
        )
        assert Client(d.url).ready() and Client(d.url).infer("orientation", X)["fetch_name_0"].shape == (1, 4)
    finally:
        assert d.stop() == 0


def test_sigterm_drains_in_flight(installed_state: Path) -> None:
    d = Daemon(installed_state)
    results: list[object] = []

    def worker() -> None:
        c = Client(d.url)
        try:
            results.append(c.infer("orientation", np.repeat(X, 8, axis=0))["fetch_name_0"].shape)
        except Exception as e:
            results.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()

    def queued() -> bool:  # on a loaded machine the client threads start late: wait for the server to hold them
        with Client(d.url) as c:
            m = re.search(r'^edgert_queue_depth\{model="orientation"\} (\d+)', c.metrics(), re.M)
        return m is not None and int(m.group(1)) >= 1

    try:
        wait_for(queued, 10, "requests waiting behind the running batch", poll=0.002)
    finally:
        code = d.stop()  # never left running, whatever happened
    for t in threads:
        t.join()
    assert code == 0 and "stopped cleanly" in d.output()
    done = [r for r in results if r == (8, 4)]
    refused = [r for r in results if isinstance(r, (ClientError, ConnectionError))]
    assert len(done) + len(refused) == 4 and done, results  # nothing accepted was dropped


def test_unix_socket(installed_state: Path, tmp_path: Path) -> None:
    sock = tmp_path / "edgert.sock"
    d = Daemon(installed_state, "--uds", str(sock))
    try:
        c = Client(f"unix:{sock}")
        assert c.ready() and c.infer("orientation", X)["fetch_name_0"].shape == (1, 4)
    finally:
        assert d.stop() == 0
    assert not sock.exists()


def test_config_unknown_key_names_line(installed_state: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("port: 8001\nbatching:\n  max_batch: 4\n  max_dealy_ms: 3\n")
    proc = edgert("serve", "--state-dir", str(installed_state), "--config", str(cfg), timeout=60)
    assert proc.returncode == 1 and "unknown key 'batching.max_dealy_ms' (line 4)" in proc.stderr


def test_install_refuses_wrong_key(orientation_bundle: Path, other_keys: Path, tmp_path: Path) -> None:
    proc = edgert(
        "install",
        str(orientation_bundle),
        "--state-dir",
        str(tmp_path / "s"),
        "--trust",
        str(other_keys / "signing.pub"),
    )
    assert proc.returncode == 1 and "does not verify" in proc.stderr
    assert not (tmp_path / "s" / "models").exists()
