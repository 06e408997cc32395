"""The HTTP daemon cannot be locked out: idle, slow and flooding clients on real sockets against
a real `edgert serve` process."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.contracts.client import ClientError
from tests.conftest import Daemon, wait_for
from tests.e2e.survival.helpers import (
    get_status,
    infer_ok,
    install_v1,
)

pytestmark = pytest.mark.e2e


def test_idle_slow_and_flooding_clients_cannot_lock_the_api_out(tmp_path: Path, keys: Path) -> None:
    import socket
    from concurrent.futures import ThreadPoolExecutor

    state = tmp_path / "state"
    install_v1(tmp_path, state, keys)
    config = tmp_path / "edgert.yaml"
    config.write_text(
        "max_connections: 4\nhttp_idle_timeout_s: 60\nhttp_request_timeout_s: 2\nmax_json_body_bytes: 4096\n"
    )
    daemon = Daemon(state, "--config", str(config))
    host, port = "127.0.0.1", daemon.port
    held: list[socket.socket] = []
    try:
        # The old lock-out: idle keep-alive connections up to the cap. Health still answers at once
        # (the longest-idle connection makes room).
        held = [socket.create_connection((host, port)) for _ in range(4)]
        time.sleep(0.3)
        t0 = time.monotonic()
        assert get_status(daemon.url + "/v2/health/ready") == 200 and time.monotonic() - t0 < 2
        for s in held:
            s.close()
        # Slowloris: four connections sending a header a byte at a time. A new client is never left
        # hanging (503 at once while they hold every slot), and they are cut at the request deadline.
        # (the handlers of the closed idle connections may take a moment to give their slots back: a
        # slow client answered 503 at once is not holding a slot, so it is replaced until 4 are held)
        held = []
        for _ in range(40):
            s = socket.create_connection((host, port))
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
            s.settimeout(0.2)
            try:
                answered = s.recv(1)
            except TimeoutError:
                answered = b""
            if answered:
                s.close()
                time.sleep(0.1)
                continue
            held.append(s)
            if len(held) == 4:
                break
        assert len(held) == 4
        t0 = time.monotonic()
        assert get_status(daemon.url + "/v2/health/ready") in (200, 503) and time.monotonic() - t0 < 2
        wait_for(lambda: get_status(daemon.url + "/v2/health/ready") == 200, 10, "the slow clients to be cut")
        for s in held:
            s.close()
        # A JSON body over the JSON limit: 413 without reading it.
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2000],
                                       "data": [0.0] * 2000}]}).encode()  # fmt: skip
        req = urllib.request.Request(daemon.url + "/v2/models/cls/infer", data=body, method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("an oversized JSON body was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 413 and "JSON body" in e.read().decode()

        # binary bodies are not held to the JSON limit (a slot of a just-closed connection may take a
        # moment to come back at this tiny cap: a 503 then is the cap working, so try again)
        def binary_ok() -> bool:
            try:
                return infer_ok(daemon.url)
            except ClientError as e:
                assert e.status == 503, e
                return False

        assert wait_for(binary_ok, 10, "a binary request answered")
        metrics = urllib.request.urlopen(daemon.url + "/metrics", timeout=5).read().decode()
        for reason in ("evicted_idle", "request_timeout", "too_large"):
            assert f'edgert_http_refused_total{{reason="{reason}"}}' in metrics, reason
    finally:
        for s in held:
            s.close()
        daemon.stop()
    # A flood: 100 clients at once against the default cap get answers, not connection resets.
    daemon = Daemon(state)
    try:
        with ThreadPoolExecutor(100) as pool:
            codes = list(pool.map(lambda _: get_status(daemon.url + "/v2/health/ready", 10), range(100)))
        assert codes == [200] * 100, sorted(set(codes))
    finally:
        daemon.stop()
