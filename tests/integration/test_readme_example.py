"""The README's device-side Python API example runs as written."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_python_api_example_runs_as_written(
    orientation_bundle: Path, keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's device-side Python block, executed: its files made for real (the orientation
    bundle re-signed as the versions it names), its client pointed at a real daemon."""
    import shutil

    import numpy as np

    from tests.conftest import Daemon, edgert, reversion

    section = README.split("\n## Python API", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "keys").mkdir()
    shutil.copy2(keys / "signing.pub", tmp_path / "keys" / "signing.pub")
    shutil.copy2(orientation_bundle, tmp_path / "orientation-1.0.0-x86-cpu.edgepkg")
    for v in ("1.1.0", "1.2.0", "2.0.0"):
        reversion(orientation_bundle, v, keys, tmp_path / f"orientation-{v}-x86-cpu.edgepkg")
    state = tmp_path / "state"
    edgert("install", str(orientation_bundle), "--state-dir", str(state), "--trust", str(keys / "signing.pub"),
           check=True)  # fmt: skip
    daemon = Daemon(state)
    monkeypatch.chdir(tmp_path)
    scope = {"batch": np.zeros((2, 3, 224, 224), np.float32)}
    try:
        exec(compile(code.replace("http://127.0.0.1:8000", daemon.url), "README.md", "exec"), scope)
    finally:
        daemon.stop()
    assert scope["out"]["fetch_name_0"].shape == (1, 4)
    assert scope["sub"].version == "1.0.0"


def test_the_host_side_example_runs_as_written(
    orientation_bundle: Path, keys: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's controller block against a real mosquitto, with one real device of group lobby."""
    import shutil

    from edge_runtime.contracts.bundle import generate_keypair
    from tests.broker import Broker
    from tests.conftest import Daemon, edgert, reversion, wait_for

    section = README.split("\n## Python API", 1)[1]
    code = section.split("```python\n", 3)[2].split("```", 1)[0]
    broker = Broker(tmp_path / "broker", {"controller": "ctl-secret", "cam-017": "cam-secret"})
    generate_keypair(tmp_path / "fleet")
    (tmp_path / "keys").mkdir()
    shutil.copy2(keys / "signing.pub", tmp_path / "keys" / "signing.pub")
    reversion(orientation_bundle, "1.1.0", keys, tmp_path / "orientation-1.1.0-x86-cpu.edgepkg")
    (tmp_path / "ctl.pw").write_text("ctl-secret")
    (tmp_path / "cam.pw").write_text("cam-secret")
    state = tmp_path / "state"
    edgert("install", str(orientation_bundle), "--state-dir", str(state), "--trust", str(keys / "signing.pub"),
           check=True)  # fmt: skip
    device = Daemon(state, "--broker", broker.url, "--device-id", "cam-017", "--group", "lobby", "--fleet-key",
                    str(tmp_path / "fleet" / "signing.pub"), "--broker-password-file", str(tmp_path / "cam.pw"),
                    "--telemetry-interval", "0.3")  # fmt: skip
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    try:
        devices = ["fleet", "--broker", broker.controller_url, "--broker-user", "controller", "--broker-password-file",
                   str(tmp_path / "ctl.pw"), "--state", str(tmp_path / "probe.db"), "devices", "--json"]  # fmt: skip
        wait_for(lambda: '"cam-017"' in edgert(*devices).stdout, 30, "the device to report to the broker")
        exec(compile(code.replace("mqtt://broker:1883", broker.controller_url), "README.md", "exec"), scope)
    finally:
        device.stop()
        broker.stop()
    rollout = scope["rollout"]
    assert rollout.status == "running" and rollout.from_version == "1.0.0" and rollout.version == "1.1.0"  # type: ignore[attr-defined]
