"""The fleet believes only what it can check: failing bundle stores, a session takeover attempt,
a false group claim; real broker, real daemon, a real misbehaving HTTP server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.contracts.bundle import load_private_key
from edge_runtime.fleet import publish_desired
from tests.broker import Broker
from tests.conftest import Daemon, edgert, wait_for
from tests.e2e.survival.helpers import (
    ACCOUNTS,
    HEALTH,
    BundleStore,
    Watcher,
    install_v1,
    password,
    serve_args,
)
from tests.fleet_models import make_bundle

pytestmark = pytest.mark.e2e


def test_a_network_blip_is_resumed_and_a_stalled_store_never_blocks_a_rollback(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    from edge_runtime.fleet import bundle_ref

    state = tmp_path / "state"
    key = keys / "signing.key"
    edgert("install", str(make_bundle(tmp_path / "1.0.0.edgepkg", key, "1.0.0")), "--state-dir", str(state),
           "--trust", str(keys / "signing.pub"), check=True)  # fmt: skip
    w = Watcher(broker, "sv3")
    ctl = broker.client("controller")
    fk = load_private_key(fleet_key / "signing.key")
    daemon = Daemon(state, *serve_args(broker, "sv3", fleet_key, password(tmp_path, "sv3")))
    stores: list[BundleStore] = []
    try:
        wait_for(lambda: w.state.get("models"), 20, "the device's state")
        # 1. The first transfer is cut half way: resumed with a Range request, never a refusal.
        v11 = make_bundle(tmp_path / "1.1.0.edgepkg", key, "1.1.0")
        flaky = BundleStore(v11.read_bytes(), "flaky")
        stores.append(flaky)
        ref = bundle_ref(v11, chunked=False, url=flaky.url)
        publish_desired(ctl, fk, "sv3", time.time_ns() // 1000, {"cls": {"version": "1.1.0", "bundle": ref,
                        "health": HEALTH}})  # fmt: skip
        wait_for(lambda: w.event("update-committed"), 60, "the update after the blip")
        assert w.event("download-interrupted") and not w.event("update-refused")
        assert any(r and r.startswith("bytes=") and r != "bytes=0-" for r in flaky.ranges), flaky.ranges
        assert w.state["models"]["cls"]["outcome"]["outcome"] == "committed"
        # 2. A store that stalls: a signed rollback to the installed 1.0.0 still goes through.
        v12 = make_bundle(tmp_path / "1.2.0.edgepkg", key, "1.2.0")
        stall = BundleStore(v12.read_bytes(), "stall")
        stores.append(stall)
        w.events.clear()
        publish_desired(ctl, fk, "sv3", time.time_ns() // 1000, {"cls": {"version": "1.2.0", "bundle": bundle_ref(
            v12, chunked=False, url=stall.url), "health": HEALTH}})  # fmt: skip
        wait_for(lambda: stall.requests >= 1, 20, "the stalled download to start")
        t0 = time.monotonic()
        publish_desired(ctl, fk, "sv3", time.time_ns() // 1000,
                        {"cls": {"version": "1.0.0", "allow_downgrade": True, "health": HEALTH}})  # fmt: skip
        wait_for(lambda: w.state.get("models", {}).get("cls", {}).get("serving") == "1.0.0", 40,
                 "the rollback despite the stalled bundle store")  # fmt: skip
        print(f"rollback applied {time.monotonic() - t0:.1f} s after it was signed, behind a stalled download")
        assert not w.event("update-refused")
        # the stalled 1.2.0 is no longer wanted: its partial download is gone (disk budget)
        wait_for(lambda: not list((state / "downloads").glob("*")), 20, "unwanted partial downloads removed")
    finally:
        for s in stores:
            s.close()
        ctl.publish("edgert/v1/devices/sv3/desired", b"", qos=1, retain=True).wait_for_publish(5)
        ctl.loop_stop()
        ctl.disconnect()
        daemon.stop()
        w.close()


def test_a_device_cannot_take_over_another_devices_session(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    """Client ids are the login on the devices' listener: sv2 reusing sv1's client id gets its own
    session, and sv1 is not disconnected. Device accounts do not work on the controllers' listener."""
    import paho.mqtt.client as mqtt

    state = tmp_path / "state"
    install_v1(tmp_path, state, keys)
    w = Watcher(broker, "sv1")
    daemon = Daemon(state, *serve_args(broker, "sv1", fleet_key, password(tmp_path, "sv1")))
    rogue = None
    try:
        wait_for(lambda: w.state.get("models"), 20, "sv1 online")
        rogue = broker.client("sv2", client_id="sv1")  # the hijack attempt
        time.sleep(2)  # a takeover would disconnect sv1 at once and its last will would say offline
        statuses = []
        probe = broker.client("controller")
        probe.on_message = lambda c, u, m: statuses.append(json.loads(m.payload)) if m.payload else None
        probe.subscribe("edgert/v1/devices/sv1/status", 1)
        wait_for(lambda: statuses, 10, "sv1's retained status")
        assert statuses[-1]["online"] is True
        assert "disconnected from the broker" not in daemon.output()
        probe.loop_stop()
        probe.disconnect()
        # A device account on the controllers' listener is refused outright.
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv5)
        c.username_pw_set("sv2", ACCOUNTS["sv2"])
        codes: list[Any] = []
        c.on_connect = lambda cl, u, f, rc, p: codes.append(rc)
        c.connect("127.0.0.1", broker.controller_port, 30)
        c.loop_start()
        wait_for(lambda: codes, 10, "the controllers' listener to answer")
        c.loop_stop()
        assert codes[0].is_failure, codes
    finally:
        if rogue is not None:
            rogue.loop_stop()
            rogue.disconnect()
        daemon.stop()
        w.close()


def test_the_fleet_keeps_its_own_record_of_a_devices_group(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    state = tmp_path / "state"
    install_v1(tmp_path, state, keys)
    pw, cpw = password(tmp_path, "sv1"), password(tmp_path, "controller")
    fleet = ["fleet", "--broker", broker.controller_url, "--broker-user", "controller", "--broker-password-file", str(cpw),
             "--state", str(tmp_path / "fleet.db")]  # fmt: skip

    def group_of(device: str) -> str | None:
        listing = json.loads(edgert(*fleet, "devices", "--json", check=True).stdout)
        return next((d["group"] for d in listing["devices"] if d["id"] == device and d["models"]), None)

    base = serve_args(broker, "sv1", fleet_key, pw)
    daemon = Daemon(state, *base)
    try:
        assert wait_for(lambda: group_of("sv1"), 20, "sv1 enrolled") == "grp-sv1"
    finally:
        daemon.stop()
    # The device now claims another group (a misconfiguration, or a device lying): not believed.
    claim = [*base[: base.index("--group")], "--group", "payments", *base[base.index("--group") + 2 :]]
    w = Watcher(broker, "sv1")
    daemon = Daemon(state, *claim)
    try:
        wait_for(lambda: w.state.get("group") == "payments", 20, "the device's new claim on the broker")
        assert group_of("sv1") == "grp-sv1"  # the claim was read, and not believed
        moved = json.loads(edgert(*fleet, "enroll", "sv1", "--group", "payments", "--json", check=True).stdout)
        assert moved == {"device": "sv1", "group": "payments", "was": "grp-sv1"}
        assert wait_for(lambda: group_of("sv1") == "payments", 10, "the operator's move")
    finally:
        daemon.stop()
        w.close()
