"""Hot swap under load: a new version installed and picked up (SIGHUP) fails no request."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.bundle import load_public_keys
from edge_runtime.contracts.client import Client
from edge_runtime.serving.runtime import Runtime
from tests.conftest import Daemon, edgert, reversion

pytestmark = pytest.mark.e2e

X = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)


def _load(url: str, stop: threading.Event, versions: list[str], errors: list[Exception]) -> None:
    with Client(url) as c:
        while not stop.is_set():
            try:
                c.infer("orientation", X)
                versions.append(c.metadata("orientation")["versions"][0])
            except Exception as e:
                errors.append(e)


def test_daemon_swap_under_load(orientation_bundle: Path, keys: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    edgert(
        "install", str(orientation_bundle), "--state-dir", str(state), "--trust", str(keys / "signing.pub"), check=True
    )
    d = Daemon(state, "--max-delay-ms", "2")
    stop, versions, errors = threading.Event(), [], []  # type: ignore[var-annotated]
    threads = [threading.Thread(target=_load, args=(d.url, stop, versions, errors)) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        v2 = reversion(orientation_bundle, "1.1.0", keys, tmp_path / "o-1.1.0.edgepkg")
        edgert("install", str(v2), "--state-dir", str(state), check=True)
        d.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not versions or versions[-1] != "1.1.0"):
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    metrics = Client(d.url).metrics()
    assert d.stop() == 0
    assert not errors, errors[:3]
    assert "1.0.0" in versions and versions[-1] == "1.1.0"
    assert 'edgert_model_swaps_total{model="orientation"} 1' in metrics
    assert 'edgert_model_loaded{model="orientation",version="1.0.0"}' not in metrics  # the old one was freed


def test_runtime_swap_under_load(orientation_bundle: Path, keys: Path, tmp_path: Path) -> None:
    rt = Runtime(load_public_keys([keys / "signing.pub"]))
    rt.load(orientation_bundle)
    v2 = reversion(orientation_bundle, "2.0.0", keys, tmp_path / "o-2.edgepkg")
    stop, errors, done = threading.Event(), [], [0]  # type: ignore[var-annotated]

    def worker() -> None:
        while not stop.is_set():
            try:
                out = rt.infer("orientation", X)
                assert out["fetch_name_0"].shape == (1, 4)
                done[0] += 1
            except Exception as e:
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    before = done[0]
    assert rt.swap(v2) == "1.0.0"
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors and done[0] > before > 0
    assert rt.get("orientation").current.version == "2.0.0"
    rt.close()


def test_swap_refuses_different_inputs(orientation_bundle: Path, keys: Path, tmp_path: Path) -> None:
    rt = Runtime(load_public_keys([keys / "signing.pub"]))
    rt.load(orientation_bundle)
    other = reversion(
        orientation_bundle, "3.0.0", keys, tmp_path / "o-3.edgepkg",
        inputs=[{"name": "x", "dtype": "float32", "shape": ["N", 3, 112, 112]}],
    )  # fmt: skip
    with pytest.raises(ValueError, match="inputs of 3.0.0 differ"):
        rt.swap(other)
    assert rt.get("orientation").current.version == "1.0.0"
    assert rt.infer("orientation", X)["fetch_name_0"].shape == (1, 4)
    rt.close()
