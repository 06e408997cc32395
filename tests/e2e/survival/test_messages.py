"""One message never kills a thread: hostile messages on every topic a device or the controller
reads, against a real mosquitto and a real `edgert serve` process."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edge_runtime.contracts.bundle import load_private_key
from edge_runtime.fleet import publish_bundle, publish_desired
from tests.broker import Broker
from tests.conftest import Daemon, edgert, wait_for
from tests.e2e.survival.helpers import (
    HEALTH,
    NESTED,
    Watcher,
    health_ok,
    infer_ok,
    install_v1,
    password,
    serve_args,
)
from tests.fleet_models import make_bundle

pytestmark = pytest.mark.e2e


def test_nested_json_on_every_subscribed_topic_is_refused_and_the_agent_goes_on(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    state = tmp_path / "state"
    install_v1(tmp_path, state, keys)
    w = Watcher(broker, "sv1")
    ctl = broker.client("controller")
    args = serve_args(broker, "sv1", fleet_key, password(tmp_path, "sv1"))
    daemon = Daemon(state, *args)
    try:
        wait_for(lambda: w.state.get("models"), 20, "the device's first state")
        hostile = [
            ("edgert/v1/devices/sv1/desired", NESTED, False),
            ("edgert/v1/groups/grp-sv1/desired", NESTED, True),  # retained: delivered again on restart
            ("edgert/v1/devices/sv1/desired", b'{"payload": ' + NESTED + b', "sig": "AA=="}', False),
            ("edgert/v1/devices/sv1/desired", b"\xff\xfe not json", False),
        ]
        for topic, payload, retain in hostile:
            ctl.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
        wait_for(lambda: sum((w.state.get("control_refused") or {}).values()) >= len(hostile), 20,
                 "every hostile message refused and counted")  # fmt: skip
        assert health_ok(daemon.url) and infer_ok(daemon.url)
        # The network thread lives: a genuine signed update is still taken, over chunks.
        v2 = make_bundle(tmp_path / "v2.edgepkg", keys / "signing.key", "1.1.0")
        ref = publish_bundle(ctl, v2, chunk_size=4096)
        publish_desired(ctl, load_private_key(fleet_key / "signing.key"), "sv1", time.time_ns() // 1000,
                        {"cls": {"version": "1.1.0", "bundle": ref, "health": HEALTH}})  # fmt: skip
        wait_for(lambda: w.event("update-committed"), 30, "the genuine update after the hostile ones")
        assert "RecursionError" not in daemon.output()
        # A restart: the retained hostile message comes again, is refused again, nothing dies.
        assert daemon.stop() == 0
        w.state = {}
        daemon = Daemon(state, *args)
        wait_for(lambda: (w.state.get("control_refused") or {}).get("malformed", 0) >= 2, 20, "refused again")
        assert w.state["models"]["cls"]["serving"] == "1.1.0" and infer_ok(daemon.url)
        metrics = urllib.request.urlopen(daemon.url + "/metrics", timeout=5).read().decode()
        assert 'edgert_agent_errors_total{where="refused-malformed"}' in metrics
    finally:
        ctl.publish("edgert/v1/groups/grp-sv1/desired", b"", qos=1, retain=True).wait_for_publish(5)
        daemon.stop()
        w.close()
        ctl.loop_stop()
        ctl.disconnect()


def test_garbage_a_device_retains_does_not_stop_the_controller(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    state = tmp_path / "state"
    install_v1(tmp_path, state, keys)
    daemon = Daemon(state, *serve_args(broker, "sv1", fleet_key, password(tmp_path, "sv1")))
    rogue = broker.client("sv2")  # a device account, writing only where the ACL lets it: its own topics
    try:
        for payload in (NESTED, b'{"device": "sv2", "models": {"cls": "x"}}', b'{"device": "sv1"}'):
            rogue.publish("edgert/v1/devices/sv2/state", payload, qos=1, retain=True).wait_for_publish(5)
        rogue.publish("edgert/v1/devices/sv2/status", NESTED, qos=1, retain=True).wait_for_publish(5)
        pw = password(tmp_path, "controller")
        cmd = ["fleet", "--broker", broker.controller_url, "--broker-user", "controller", "--broker-password-file", str(pw),
               "--state", str(tmp_path / "fleet.db"), "devices", "--json"]  # fmt: skip
        listing = wait_for(
            lambda: (r := edgert(*cmd)).returncode == 0
            and any(d["id"] == "sv1" and d["models"] for d in json.loads(r.stdout)["devices"])
            and json.loads(r.stdout),
            30, "the controller to list the healthy device despite the garbage",
        )  # fmt: skip
        rogue_view = [d for d in listing["devices"] if d["id"] == "sv2"]
        assert not rogue_view or not rogue_view[0]["models"]  # nothing of the garbage was believed
    finally:
        for topic in ("state", "status"):
            rogue.publish(f"edgert/v1/devices/sv2/{topic}", b"", qos=1, retain=True).wait_for_publish(5)
        rogue.loop_stop()
        rogue.disconnect()
        daemon.stop()
