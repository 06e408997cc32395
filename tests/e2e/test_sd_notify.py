"""sd_notify with a fake NOTIFY_SOCKET: READY only after warm-up, WATCHDOG while the serving
loop progresses, silence once a backend really hangs, STOPPING on SIGTERM."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.bundle import load_private_key, sha256_bytes, write_bundle
from edge_runtime.contracts.client import Client
from tests.conftest import edgert, free_port

pytestmark = pytest.mark.e2e


def loop_model() -> bytes:
    """y = x + n, computed one iteration at a time: a request with a huge n really hangs the backend."""
    from onnx import TensorProto, helper

    t = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [t("i", TensorProto.INT64, []), t("cond_in", TensorProto.BOOL, []), t("acc_in", TensorProto.FLOAT, [1])],
        [t("cond_out", TensorProto.BOOL, []), t("acc_out", TensorProto.FLOAT, [1])],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "yes", "x"], ["y"], body=body)],
        "spin",
        [t("x", TensorProto.FLOAT, [1]), t("n", TensorProto.INT64, [])],
        [t("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("yes", TensorProto.BOOL, [], [True])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture()
def state(tmp_path: Path, keys: Path, orientation_bundle: Path) -> Path:
    model = loop_model()
    warm = io.BytesIO()
    np.savez(warm, x=np.zeros(1, np.float32), n=np.array(1, np.int64))
    spin = tmp_path / "spin.edgepkg"
    write_bundle(
        spin,
        {"name": "spin", "version": "1.0.0", "target": "x86-cpu", "runtime": "onnxruntime", "model": "model.onnx",
         "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}, {"name": "n", "dtype": "int64", "shape": []}],
         "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}], "precision": "fp32",
         "batching": {"max_batch": 1, "batchable": False, "warmup": "warmup.npz"},
         "source_sha256": sha256_bytes(model), "key_id": ""},
        {"model.onnx": model, "warmup.npz": warm.getvalue()},
        load_private_key(keys / "signing.key"),
    )  # fmt: skip
    st = tmp_path / "state"
    for b in (orientation_bundle, spin):
        edgert("install", str(b), "--state-dir", str(st), "--trust", str(keys / "signing.pub"), check=True)
    return st


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, m in self.messages if "WATCHDOG=1" in m and t >= since]

    def close(self) -> None:
        self._stop.set()
        self._t.join()
        self.sock.close()


def _serve_until_ready(
    state: Path, tmp_path: Path, extra_env: dict[str, str]
) -> tuple[NotifyListener, subprocess.Popen[bytes], int]:
    """The daemon with NOTIFY_SOCKET pointing at a socket this test listens on, until READY=1."""
    listener = NotifyListener(tmp_path / "notify.sock")
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), **extra_env}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--state-dir", str(state), "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any("READY=1" in m for _, m in listener.messages) and time.monotonic() < deadline:
        assert proc.poll() is None, "the daemon exited before READY"
        time.sleep(0.05)
    assert any("READY=1" in m for _, m in listener.messages), "no READY=1 within 60 s"
    return listener, proc, port


def test_ready_watchdog_hang_and_stopping(state: Path, tmp_path: Path) -> None:
    listener, proc, port = _serve_until_ready(state, tmp_path, {"WATCHDOG_USEC": "600000"})
    try:
        texts = [m for _, m in listener.messages]
        ready_at = next(i for i, m in enumerate(texts) if "READY=1" in m)
        loading = [i for i, m in enumerate(texts) if "STATUS=loading and warming" in m]
        assert len(loading) == 2 and max(loading) < ready_at  # READY only after both models warmed
        assert Client(f"http://127.0.0.1:{port}").ready()

        time.sleep(2.0)
        t0 = time.monotonic() - 2.0
        healthy = listener.pings(t0)
        assert len(healthy) >= 4, f"{len(healthy)} pings in 2 s with a 0.6 s watchdog"

        def hang() -> None:
            with contextlib.suppress(Exception):  # the request never answers: that is the point
                Client(f"http://127.0.0.1:{port}", timeout=3).infer(
                    "spin", {"x": np.zeros(1, np.float32), "n": np.array(10**12, np.int64)}
                )

        threading.Thread(target=hang, daemon=True).start()
        time.sleep(1.0)  # give the stall time to exceed the interval
        quiet_from = time.monotonic()
        time.sleep(2.0)
        assert listener.pings(quiet_from) == [], "pings continued while the backend was hung"
        assert any("STATUS=stalled" in m for _, m in listener.messages)
        # A healthy model cannot hide the hung one: health is all models, not any.
        assert Client(f"http://127.0.0.1:{port}").live()
    finally:
        proc.kill()  # hung: systemd would SIGKILL it after TimeoutStopSec too
        proc.wait()
        listener.close()


def test_stopping_on_sigterm(state: Path, tmp_path: Path) -> None:
    listener, proc, _ = _serve_until_ready(state, tmp_path, {})
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        time.sleep(0.3)
        assert any("STOPPING=1" in m for _, m in listener.messages)
        assert not listener.pings()  # no WATCHDOG_USEC: no pings
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        listener.close()
