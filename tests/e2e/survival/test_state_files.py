"""Start-up and state files degrade, never brick: corrupt and missing state files, a read-only
state dir (a real read-only bind mount), with a real daemon and broker."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from edge_runtime.contracts.bundle import load_private_key
from edge_runtime.contracts.client import Client
from edge_runtime.contracts.signed import desired_payload, sign
from edge_runtime.fleet import publish_desired
from tests.broker import Broker
from tests.conftest import Daemon, edgert, wait_for
from tests.e2e.survival.helpers import (
    Watcher,
    health_ok,
    infer_ok,
    install_v1,
    password,
    serve_args,
)
from tests.fleet_models import make_bundle

pytestmark = pytest.mark.e2e


def test_corrupt_state_files_degrade_and_are_rebuilt(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    state = tmp_path / "state"
    key = keys / "signing.key"
    for name, version in (("cls", "1.0.0"), ("other", "0.9.0"), ("other", "1.0.0")):
        b = make_bundle(tmp_path / f"{name}-{version}.edgepkg", key, version, name=name)
        edgert("install", str(b), "--state-dir", str(state), "--trust", str(keys / "signing.pub"), check=True)
    args = serve_args(broker, "sv3", fleet_key, password(tmp_path, "sv3"))
    Daemon(state, *args).stop()  # a first run creates the outbox
    # One bit flipped in one of the two models' active bundle; garbage in every small state file.
    bundle = state / "models" / "other" / "1.0.0.edgepkg"
    data = bytearray(bundle.read_bytes())
    data[len(data) // 2] ^= 0x10
    bundle.write_bytes(bytes(data))
    agent = state / "agent"
    agent.mkdir(exist_ok=True)
    for f in ("control-seq.json", "counters.json", "outcomes.json"):
        (agent / f).write_bytes(b"\x00garbage{{")
    (agent / "control-seq.json.bak").unlink(missing_ok=True)  # nothing left to rebuild the guard from
    (state / "models" / "cls" / "pending.json").write_text("[[[")
    (state / "history.json").write_text('{"rollbacks": 7}')
    (state / "outbox.db").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(state / "outbox.db") + suffix).unlink(missing_ok=True)

    status = edgert("status", "--state-dir", str(state), "--json")
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    w = Watcher(broker, "sv3")
    daemon = Daemon(state, *args)
    try:
        assert health_ok(daemon.url) and infer_ok(daemon.url)
        with Client(daemon.url) as c:
            assert c.metadata("other")["versions"] == ["0.9.0"]  # the broken 1.0.0 reported, 0.9.0 served
        st = wait_for(lambda: w.state.get("state_files_rebuilt") and w.state, 20, "the rebuilt state reported")
        assert st["state_files_rebuilt"] >= 5 and st["last_rollback"]["from"] == "1.0.0"
        aside = {p.name.split(".corrupt-")[0] for p in state.rglob("*.corrupt-*")}
        assert {"control-seq.json", "counters.json", "outcomes.json", "pending.json", "history.json",
                "outbox.db"} <= aside, aside  # fmt: skip
        wait_for(lambda: w.event("state-file-rebuilt"), 20, "a state-file-rebuilt event")
        # The guard failed closed: a desired state issued before it was rebuilt is refused...
        ctl = broker.client("controller")
        fk = load_private_key(fleet_key / "signing.key")
        old = sign(desired_payload("sv3", int(time.time() * 1000) - 60_000, {"cls": {"version": "1.0.0"}}), fk)
        ctl.publish("edgert/v1/devices/sv3/desired", old, qos=1).wait_for_publish(5)
        wait_for(lambda: (w.state.get("control_refused") or {}).get("replayed"), 20, "the old state refused")
        # ...and a newly signed one is taken.
        publish_desired(ctl, fk, "sv3", int(time.time() * 1000) + 1000, {"cls": {"version": "1.0.0"}})
        wait_for(lambda: w.state.get("desired_seq", {}).get("sv3"), 20, "the new desired state accepted")
        ctl.loop_stop()
        ctl.disconnect()
        status = edgert("status", "--state-dir", str(state), "--json", check=True)
        assert json.loads(status.stdout)["models"]["other"]["version"] == "0.9.0"
    finally:
        daemon.stop()
        w.close()


def test_read_only_state_dir_with_mqtt_still_serves(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    ro.mkdir()
    install_v1(tmp_path, rw, keys)
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(rw), str(ro)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here (needs root/CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        assert subprocess.run(["touch", str(ro / "x")], capture_output=True).returncode != 0  # really read-only
        w = Watcher(broker, "sv3")
        args = serve_args(broker, "sv3", fleet_key, password(tmp_path, "sv3"))
        daemon = Daemon(ro, *args, log=tmp_path / "daemon.log")
        try:
            assert health_ok(daemon.url) and infer_ok(daemon.url)
            st = wait_for(lambda: w.state.get("models") and w.state, 20, "the device to join the fleet anyway")
            assert st["models"]["cls"]["serving"] == "1.0.0"
            assert "outbox degraded to memory" in daemon.output()
        finally:
            daemon.stop()
            w.close()
    finally:
        subprocess.run(["umount", str(ro)], check=True)
