"""Disk is finite: a real daemon on a small real tmpfs, filled to the last byte during telemetry
and during a chunked download."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.contracts.bundle import load_private_key
from edge_runtime.fleet import publish_bundle, publish_desired
from tests.broker import Broker
from tests.conftest import Daemon, wait_for
from tests.e2e.survival.helpers import (
    HEALTH,
    Watcher,
    fill,
    health_ok,
    infer_ok,
    install_v1,
    mount_tmpfs,
    password,
    serve_args,
)
from tests.fleet_models import make_bundle

pytestmark = pytest.mark.e2e


def test_full_disk_during_telemetry_is_survived_and_telemetry_resumes(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk)
    try:
        state = disk / "state"
        install_v1(tmp_path, state, keys)
        w = Watcher(broker, "sv1")
        daemon = Daemon(state, *serve_args(broker, "sv1", fleet_key, password(tmp_path, "sv1")),
                        log=tmp_path / "daemon.log")  # fmt: skip
        try:
            wait_for(lambda: len(w.telemetry_seqs) >= 3, 20, "telemetry flowing")
            filler = disk / "filler"
            fill(filler)
            os.sync()
            time.sleep(3)  # ten telemetry periods on a full disk
            assert health_ok(daemon.url) and infer_ok(daemon.url)
            metrics = urllib.request.urlopen(daemon.url + "/metrics", timeout=5).read().decode()
            assert 'edgert_agent_errors_total{where="telemetry"}' in metrics, metrics[-2000:]
            seen = max(w.telemetry_seqs)
            filler.unlink()  # space returns: telemetry resumes by itself
            wait_for(lambda: max(w.telemetry_seqs) > seen + 2, 20, "telemetry to resume after space returned")
            assert daemon.proc.poll() is None
        finally:
            daemon.stop()
            w.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_during_a_chunked_download_frees_it_and_the_update_completes_later(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk)
    w = Watcher(broker, "sv1")
    ctl = broker.client("controller")
    daemon = None
    try:
        state = disk / "state"
        install_v1(tmp_path, state, keys)
        daemon = Daemon(state, *serve_args(broker, "sv1", fleet_key, password(tmp_path, "sv1")),
                        log=tmp_path / "daemon.log")  # fmt: skip
        wait_for(lambda: w.state.get("models"), 20, "the device's state")
        filler = disk / "filler"
        fill(filler)
        v2 = make_bundle(tmp_path / "v2.edgepkg", keys / "signing.key", "1.1.0")
        ref = publish_bundle(ctl, v2, chunk_size=1024)
        publish_desired(ctl, load_private_key(fleet_key / "signing.key"), "sv1", time.time_ns() // 1000,
                        {"cls": {"version": "1.1.0", "bundle": ref, "health": HEALTH}})  # fmt: skip
        time.sleep(3)  # the chunks arrive on a full disk
        assert daemon.proc.poll() is None and health_ok(daemon.url) and infer_ok(daemon.url)
        chunk_dir = state / "downloads" / ref.sha256
        assert not chunk_dir.exists() or not list(chunk_dir.glob("*.chunk"))  # what it held was freed
        assert "abandoned" in daemon.output() and "Traceback" not in daemon.output()
        filler.unlink()  # space returns: the transfer starts over from the retained chunks
        wait_for(lambda: w.state.get("models", {}).get("cls", {}).get("serving") == "1.1.0", 60,
                 "the update once space returned")  # fmt: skip
        assert not (state / "downloads" / f"{ref.sha256}.edgepkg").exists()  # the store holds it, not downloads
    finally:
        if daemon is not None:
            daemon.stop()
        ctl.publish("edgert/v1/devices/sv1/desired", b"", qos=1, retain=True).wait_for_publish(5)
        ctl.loop_stop()
        ctl.disconnect()
        w.close()
        subprocess.run(["umount", "-l", str(disk)], check=True)
