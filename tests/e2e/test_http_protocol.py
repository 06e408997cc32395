"""The event-loop HTTP server against raw sockets: keep-alive, HTTP/1.0, pipelining, chunked
bodies, lying lengths, oversized headers, clients that stop reading, half-closed clients, a
burst of 500 connections, the unix socket; raw uint8 camera frames preprocessed by the daemon;
instance groups. A real `edgert serve` process and the real orientation model throughout."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.bundle import load_public_keys, read_bundle
from edge_runtime.contracts.client import Client
from edge_runtime.contracts.oip import encode_request
from edge_runtime.serving.preprocess import preprocess
from tests.conftest import Daemon

pytestmark = pytest.mark.e2e

X = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)


@pytest.fixture(scope="module")
def daemon(installed_state: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    cfg = tmp_path_factory.mktemp("cfg") / "edgert.yaml"
    sock = cfg.parent / "edgert.sock"
    cfg.write_text(
        f"uds: {sock}\nhttp_request_timeout_s: 2\nhttp_idle_timeout_s: 5\nmax_connections: 64\n"
        "max_json_body_bytes: 2000000\nbatching:\n  instances: 2\n"
    )
    d = Daemon(installed_state, "--config", str(cfg))
    d.uds = sock  # type: ignore[attr-defined]
    yield d
    assert d.stop() == 0


def _connect(d: Daemon, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", d.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_response(f: object) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response from a socket file (status, lower-cased headers, body)."""
    line = f.readline()  # type: ignore[attr-defined]
    assert line, "connection closed before a response"
    status = int(line.split()[1])
    headers: dict[str, str] = {}
    while True:
        h = f.readline().decode("latin-1").strip()  # type: ignore[attr-defined]
        if not h:
            break
        k, _, v = h.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers.get("content-length", "0")))  # type: ignore[attr-defined]
    return status, headers, body


def _infer_bytes(path: str = "/v2/models/orientation/infer", http: str = "1.1", extra: str = "") -> bytes:
    body, hlen = encode_request({"x": X})
    head = (
        f"POST {path} HTTP/{http}\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {hlen}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def _metric(d: Daemon, name: str, **labels: str) -> float:
    with Client(d.url) as c:
        text = c.metrics()
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{{{re.escape(lab)}}} (\S+)$" if lab else rf"^{re.escape(name)} (\S+)$", text,
                  re.M)  # fmt: skip
    return float(m.group(1)) if m else 0.0


def test_keep_alive_and_pipelined_requests_are_answered_in_order(daemon: Daemon) -> None:
    expected = Client(daemon.url).infer("orientation", X)["fetch_name_0"]
    with _connect(daemon) as s, s.makefile("rb") as f:
        # three requests in one write: a health check, an inference, the model's metadata
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" + _infer_bytes()
                  + b"GET /v2/models/orientation HTTP/1.1\r\nHost: x\r\n\r\n")  # fmt: skip
        status, _, body = _read_response(f)
        assert status == 200 and json.loads(body) == {"live": True}
        status, headers, body = _read_response(f)
        assert status == 200
        hlen = int(headers["inference-header-content-length"])
        head = json.loads(body[:hlen])
        got = np.frombuffer(body[hlen:], np.float32).reshape(head["outputs"][0]["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        status, _, body = _read_response(f)
        assert status == 200 and json.loads(body)["name"] == "orientation"
        # the connection stays open for more (keep-alive)
        for _ in range(3):
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(f)[0] == 200


def test_http10_closes_unless_asked_to_keep_alive(daemon: Daemon) -> None:
    with _connect(daemon) as s, s.makefile("rb") as f:
        s.sendall(b"GET /v2/health/live HTTP/1.0\r\n\r\n")
        status, headers, _ = _read_response(f)
        assert status == 200 and headers["connection"] == "close"
        assert f.read() == b""  # closed by the server
    with _connect(daemon) as s, s.makefile("rb") as f:
        s.sendall(_infer_bytes(http="1.0", extra="Connection: keep-alive\r\n"))
        status, headers, _ = _read_response(f)
        assert status == 200 and headers["connection"] == "keep-alive"
        s.sendall(b"GET /v2/health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert _read_response(f)[0] == 200


def test_chunked_bodies_are_read_within_the_limit(daemon: Daemon) -> None:
    x = np.round(X.astype(np.float64), 1)  # short numbers: the JSON body stays under this daemon's 2 MB JSON limit
    doc = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 224, 224],
                                  "data": x.ravel().tolist()}]}).encode()  # fmt: skip
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(doc[i : i + 65536]), doc[i : i + 65536]) for i in range(0, len(doc), 65536)
    )
    with _connect(daemon) as s, s.makefile("rb") as f:
        s.sendall(b"POST /v2/models/orientation/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                  + chunks + b"0\r\n\r\n")  # fmt: skip
        status, _, body = _read_response(f)
        assert status == 200, body
        assert json.loads(body)["outputs"][0]["shape"] == [1, 4]
    before = _metric(daemon, "edgert_http_refused_total", reason="too_large")
    with _connect(daemon) as s, s.makefile("rb") as f:
        s.sendall(b"POST /v2/models/orientation/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):  # 40 x 64 KiB > the 2 MB JSON limit of this daemon
            try:
                s.sendall(b"10000\r\n" + b" " * 65536 + b"\r\n")
            except OSError:
                break  # the server answered and closed
        status, _, body = _read_response(f)
        assert status == 413 and b"chunked body exceeds" in body
    assert _metric(daemon, "edgert_http_refused_total", reason="too_large") == before + 1


def test_lying_lengths_and_oversized_headers_are_refused(daemon: Daemon) -> None:
    # Content-Length larger than what is sent: the request deadline (2 s) answers 408 and closes
    before = _metric(daemon, "edgert_http_refused_total", reason="request_timeout")
    with _connect(daemon) as s, s.makefile("rb") as f:
        t0 = time.monotonic()
        s.sendall(b"POST /v2/models/orientation/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{}")
        status, _, body = _read_response(f)
        assert status == 408 and b"not complete within 2 s" in body
        assert 1.5 < time.monotonic() - t0 < 5
    assert _metric(daemon, "edgert_http_refused_total", reason="request_timeout") == before + 1
    # a binary header length beyond the body
    body, hlen = encode_request({"x": X})
    with _connect(daemon) as s, s.makefile("rb") as f:
        s.sendall(f"POST /v2/models/orientation/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: "
                  f"{len(body) + 10}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
        status, _, answer = _read_response(f)
        assert status == 400 and b"outside the body" in answer
        # a binary_data_size that disagrees with the shape
        bad = body.replace(b'"binary_data_size":602112', b'"binary_data_size":602110')
        s.sendall(f"POST /v2/models/orientation/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: "
                  f"{hlen}\r\nContent-Length: {len(bad)}\r\n\r\n".encode() + bad)  # fmt: skip
        status, _, answer = _read_response(f)
        assert status == 400 and b"does not match shape" in answer
    # 100 kB of headers: 431 at once, connection closed
    with _connect(daemon) as s, s.makefile("rb") as f:
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\n" + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000)
                                                                 for i in range(100)) + b"\r\n")  # fmt: skip
        status, headers, answer = _read_response(f)
        assert status == 431 and headers["connection"] == "close"
    # garbage instead of HTTP
    with _connect(daemon) as s, s.makefile("rb") as f:
        s.sendall(b"\x16\x03\x01\x02\x00 hello TLS\r\n\r\n")
        status, _, answer = _read_response(f)
        assert status == 400 and b"malformed HTTP request" in answer


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_large_body_in_pieces_is_received_in_place_and_a_pipelined_request_after_it_is_answered(
    daemon: Daemon,
) -> None:
    """The tensor body (602 kB) arrives in 40 kB pieces with pauses, so the server's parser stops
    inside it and the rest is received in place; the next request rides in the same write as the
    body's last bytes and must be neither swallowed into the tensor nor lost."""
    expected = Client(daemon.url).infer("orientation", X)["fetch_name_0"]
    data = _infer_bytes()
    tail = b"GET /v2/models/orientation HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(daemon) as s, s.makefile("rb") as f:
        cut = data.index(b"\r\n\r\n") + 4 + 100  # the headers and 100 bytes of the body first
        s.sendall(data[:cut])
        time.sleep(0.05)
        rest = data[cut:]
        for i in range(0, len(rest) - 1000, 40_000):
            s.sendall(rest[i : i + 40_000])
            time.sleep(0.002)
        s.sendall(rest[i + 40_000 :] + tail)
        status, headers, body = _read_response(f)
        assert status == 200
        hlen = int(headers["inference-header-content-length"])
        got = np.frombuffer(body[hlen:], np.float32).reshape(json.loads(body[:hlen])["outputs"][0]["shape"])
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        status, _, body = _read_response(f)
        assert status == 200 and json.loads(body)["name"] == "orientation"
        # and the connection goes on with a fresh parser: an inference in one write, then one byte at a time
        s.sendall(data)
        assert _read_response(f)[0] == 200


def test_announced_bodies_that_never_come_cost_no_memory_and_time_out(daemon: Daemon) -> None:
    """30 clients each announce a 60 MB binary body (under the 64 MB limit) and send 1 kB of it: the
    in-place buffers are not committed until bytes arrive, so the daemon's memory barely moves; each
    is answered 408 at the request deadline and the API keeps answering meanwhile."""
    pid = daemon.proc.pid
    before_rss = _rss_mb(pid)
    before = _metric(daemon, "edgert_http_refused_total", reason="request_timeout")
    socks = []
    for _ in range(30):
        s = _connect(daemon)
        s.sendall(b"POST /v2/models/orientation/infer HTTP/1.1\r\nHost: x\r\nInference-Header-Content-Length: 10"
                  b"\r\nContent-Length: 60000000\r\n\r\n" + b"x" * 1000)  # fmt: skip
        socks.append(s)
    time.sleep(0.5)
    grown = _rss_mb(pid) - before_rss
    assert grown < 100, f"daemon RSS grew {grown:.0f} MB for 30 announced bodies"
    with Client(daemon.url, timeout=5) as c:
        assert c.ready()
    for s in socks:
        with s, s.makefile("rb") as f:
            status, _, body = _read_response(f)
            assert status == 408 and b"not complete within 2 s" in body
    assert _metric(daemon, "edgert_http_refused_total", reason="request_timeout") == before + 30


def test_a_client_that_stops_reading_is_cut_and_others_keep_answers(daemon: Daemon) -> None:
    before = _metric(daemon, "edgert_http_refused_total", reason="write_timeout")
    s = _connect(daemon)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    metrics_request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    s.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # pipeline /metrics forever, never read an answer
        try:
            sent += s.send(metrics_request * 50)
        except BlockingIOError:
            time.sleep(0.05)  # the server stopped reading us (backpressure)
        except OSError:
            break  # cut
        with Client(daemon.url, timeout=5) as c:
            assert c.live()  # everyone else is answered meanwhile
    s.close()
    assert _metric(daemon, "edgert_http_refused_total", reason="write_timeout") == before + 1


def test_a_half_closed_client_still_gets_its_answer(daemon: Daemon) -> None:
    with _connect(daemon) as s, s.makefile("rb") as f:
        s.sendall(_infer_bytes())
        s.shutdown(socket.SHUT_WR)  # the client is done sending
        status, _, _ = _read_response(f)
        assert status == 200
        assert f.read() == b""  # then the server closes


def test_a_burst_of_500_connections_is_answered_and_a_normal_client_throughout(daemon: Daemon) -> None:
    """At a cap of 64: every one of 500 simultaneous clients gets an HTTP answer (200, or 503 at
    once when over the cap), none is reset or left hanging, and a client polling health during
    the burst is answered every time."""
    stop = threading.Event()
    health: list[tuple[int, float]] = []

    def poll() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                with Client(daemon.url, timeout=5) as c:
                    ok = c.ready()
                health.append((200 if ok else 503, time.monotonic() - t0))
            except OSError:
                health.append((-1, time.monotonic() - t0))
            time.sleep(0.05)

    def one(_: int) -> int:
        try:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s, s.makefile("rb") as f:
                s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return _read_response(f)[0]
        except OSError as e:
            return -1 if not isinstance(e, TimeoutError) else -2

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(500) as pool:
            codes = list(pool.map(one, range(500)))
    finally:
        stop.set()
        poller.join()
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes.count(200) >= 64
    # a 503 on the health poll is the cap working; what must never happen is no answer
    assert all(code in (200, 503) for code, _ in health) and len(health) >= 3
    assert max(t for _, t in health) < 3
    with Client(daemon.url) as c:
        assert c.ready()


def test_unix_socket_keep_alive_and_pipelining(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(daemon.uds))  # type: ignore[attr-defined]
        with s.makefile("rb") as f:
            s.sendall(_infer_bytes() * 3)
            for _ in range(3):
                status, headers, _ = _read_response(f)
                assert status == 200 and "inference-header-content-length" in headers


def test_raw_uint8_frames_are_preprocessed_by_the_daemon(daemon: Daemon, orientation_bundle: Path, keys: Path) -> None:
    """A 640x480 BGR camera frame, sent as it is (0.9 MB uint8), gives the same answer as the
    float tensor the bundle's preprocessing makes of it (3.7 MB at 640x480 would be needed
    without it, 0.6 MB after resizing)."""
    manifest = read_bundle(orientation_bundle, load_public_keys([keys / "signing.pub"])).manifest
    assert manifest.preprocess is not None
    rng = np.random.default_rng(7)
    frames = rng.integers(0, 255, (2, 480, 640, 3), dtype=np.uint8)
    with Client(daemon.url) as c:
        meta = c.metadata("orientation")
        assert meta["parameters"]["raw_frames"][0]["input"] == "x"
        assert meta["parameters"]["instances"] == 2
        tensor = np.stack([preprocess(f, manifest.preprocess) for f in frames])
        want = c.infer("orientation", {"x": tensor})["fetch_name_0"]
        one = c.infer("orientation", {"x": frames[0]})["fetch_name_0"]  # [H,W,C]
        both = c.infer("orientation", {"x": frames})["fetch_name_0"]  # [N,H,W,C]
    np.testing.assert_allclose(one, want[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both, want, rtol=1e-5, atol=1e-6)
    assert _metric(daemon, "edgert_raw_frames_total", model="orientation") >= 2
    # a frame that is not an image: a 400 that names what was expected
    with Client(daemon.url) as c, pytest.raises(Exception, match="expects"):
        c.infer("orientation", {"x": np.zeros((480, 640, 2), np.uint8)})


def test_instances_answer_concurrent_requests_correctly(daemon: Daemon) -> None:
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 3, 224, 224)).astype(np.float32) for _ in range(8)]
    with Client(daemon.url) as c:
        want = [c.infer("orientation", x)["fetch_name_0"] for x in xs]

    def run(i: int) -> np.ndarray:
        with Client(daemon.url) as c:
            return c.infer("orientation", xs[i % 8])["fetch_name_0"]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, range(64)))
    for i, g in enumerate(got):
        np.testing.assert_allclose(g, want[i % 8], rtol=1e-4, atol=1e-5)


def test_a_lone_request_runs_at_once_and_concurrent_ones_are_batched(daemon: Daemon) -> None:
    """One client alone: each request finds the model idle and its answer is awaited on the loop (no
    wake-up of the loop). Many clients: none is awaited and the batcher forms batches of several rows."""
    with Client(daemon.url) as c:  # one queued run teaches the daemon the model's run time
        c.infer("orientation", X)
    inline0 = _metric(daemon, "edgert_lone_requests_total", model="orientation")
    with Client(daemon.url) as c:
        for _ in range(10):
            c.infer("orientation", X)
    # A lone request is awaited only while the model's run time stays under inline_max_ms (10 ms); a
    # run stretched by other load on the machine (seen once: 9 of 10) is handed off instead, correctly.
    assert _metric(daemon, "edgert_lone_requests_total", model="orientation") >= inline0 + 8
    batches0 = _metric(daemon, "edgert_batch_size_count", model="orientation")
    rows0 = _metric(daemon, "edgert_batch_size_sum", model="orientation")
    inline1 = _metric(daemon, "edgert_lone_requests_total", model="orientation")

    def run(_: int) -> None:
        with Client(daemon.url) as c:
            for _ in range(8):
                c.infer("orientation", X)

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(run, range(24)))
    inline = _metric(daemon, "edgert_lone_requests_total", model="orientation") - inline1
    batches = _metric(daemon, "edgert_batch_size_count", model="orientation") - batches0
    rows = _metric(daemon, "edgert_batch_size_sum", model="orientation") - rows0
    assert rows == 24 * 8 and inline < 24 and rows / batches > 1.5, (rows, batches, inline)
