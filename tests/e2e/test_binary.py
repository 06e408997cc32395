"""The device binary, built for real with PyInstaller in both layouts (one file, one folder),
serves a bundle from a clean directory under `env -i` (no Python, no PATH, no HOME) and answers
an inference request."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.contracts.client import Client
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="session")
def binary() -> Path:
    """Build dist/edgert and dist/edgert-dir (reuses .venv-build; PyInstaller takes a minute or two)."""
    out = REPO / "dist" / "edgert"
    if not os.environ.get("EDGERT_REUSE_BINARY") or not out.exists() or not (REPO / "dist" / "edgert-dir").is_dir():
        subprocess.run(["bash", str(REPO / "packaging" / "build-binary.sh")], check=True, timeout=1800)
    return out


@pytest.mark.parametrize("layout", ["one-file", "one-folder"])
def test_binary_serves_under_env_i(
    binary: Path, layout: str, tmp_path: Path, orientation_bundle: Path, keys: Path
) -> None:
    clean = tmp_path / "device"
    clean.mkdir()
    exe = clean / "edgert"
    if layout == "one-file":
        shutil.copy2(binary, exe)
    else:  # the folder, and a wrapper as the device image lays down
        shutil.copytree(binary.parent / "edgert-dir", clean / "lib", symlinks=True)
        exe.write_text('#!/bin/sh\nexec "$(dirname "$0")/lib/edgert" "$@"\n')
        exe.chmod(0o755)
    shutil.copy2(orientation_bundle, clean / "o.edgepkg")
    shutil.copy2(keys / "signing.pub", clean / "fleet.pub")
    run = ["env", "-i", "./edgert"]
    inst = subprocess.run([*run, "install", "o.edgepkg", "--state-dir", "state", "--trust", "fleet.pub"],
                          cwd=clean, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert inst.returncode == 0, inst.stdout + inst.stderr
    port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([*run, "serve", "--state-dir", "state", "--port", str(port)], cwd=clean,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        c = Client(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "binary exited"
            try:
                if c.ready():
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "not ready in 120 s"
            time.sleep(0.05)
        ready_s = time.monotonic() - t0
        y = c.infer("orientation", np.zeros((1, 3, 224, 224), np.float32))["fetch_name_0"]
        first_s = time.monotonic() - t0
        assert y.shape == (1, 4) and np.isfinite(y).all()
        print(f"{layout} binary: ready {ready_s:.2f} s, first answer {first_s:.2f} s")
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_binary_has_no_host_tools(binary: Path, tmp_path: Path) -> None:
    args = ["pack", "m.onnx", "--target", "x86-cpu", "--calib", ".", "--eval", ".", "--name", "m", "--version", "1.0.0"]
    proc = subprocess.run(
        ["env", "-i", str(binary), *args, "--signing-key", "k"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 1 and "not in this build" in proc.stderr, proc.stderr
    proc = subprocess.run(["env", "-i", str(binary), "fleet", "devices"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1 and "not in this build" in proc.stderr, proc.stderr


def test_binary_contents_are_the_device_side_only(binary: Path) -> None:
    """The PyInstaller spec excludes the host folders whole: list what the binary really holds."""
    lister = [str(REPO / ".venv-build" / "bin" / "python"), str(REPO / "packaging" / "list-binary.py"), str(binary)]
    mods = subprocess.run(lister, capture_output=True, text=True, check=True, timeout=120).stdout.split()
    ours = [m for m in mods if m.startswith("edge_runtime")]
    print(f"{len(ours)} edge_runtime modules in the binary: {' '.join(ours)}")
    host = [m for m in ours if m.startswith(("edge_runtime.pack", "edge_runtime.fleet", "edge_runtime.flash",
                                             "edge_runtime.cli.host"))]  # fmt: skip
    assert host == [], host
    assert {"edge_runtime.device.daemon", "edge_runtime.device.agent.session", "edge_runtime.serving.runtime",
            "edge_runtime.contracts.fleet", "edge_runtime.backends.onnxruntime"} <= set(ours)  # fmt: skip
    assert not [m for m in mods if m.split(".")[0] in ("onnx", "tensorflow", "onnx2tf", "sympy", "matplotlib")]
