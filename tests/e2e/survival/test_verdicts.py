"""Verdicts the fleet can trust (a window cut by shutdown) and an agent that cannot die quietly."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edge_runtime.contracts.bundle import load_private_key
from edge_runtime.contracts.client import Client
from edge_runtime.fleet import publish_desired
from tests.broker import Broker
from tests.conftest import Daemon, edgert, wait_for
from tests.e2e.survival.helpers import (
    ACCOUNTS,
    Watcher,
    password,
    serve_args,
)
from tests.fleet_models import inputs, make_bundle

pytestmark = pytest.mark.e2e


def test_a_window_interrupted_by_shutdown_resumes_on_the_desired_version(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    """A fleet rollback (a signed downgrade) whose health window is cut by SIGTERM: after the
    restart the device converges on the desired version, it does not stay on the aborted one."""
    state = tmp_path / "state"
    key = keys / "signing.key"
    for version in ("1.1.0", "1.2.0"):  # 1.2.0 active: the version the fleet aborted
        edgert("install", str(make_bundle(tmp_path / f"{version}.edgepkg", key, version)), "--state-dir", str(state),
               "--trust", str(keys / "signing.pub"), check=True)  # fmt: skip
    w = Watcher(broker, "sv2")
    ctl = broker.client("controller")
    args = serve_args(broker, "sv2", fleet_key, password(tmp_path, "sv2"))
    daemon = Daemon(state, *args)
    try:
        wait_for(lambda: w.state.get("models"), 20, "the device's state")
        spec = {"cls": {"version": "1.1.0", "allow_downgrade": True, "health": {"window_s": 30, "min_inferences": 1}}}
        publish_desired(ctl, load_private_key(fleet_key / "signing.key"), "sv2", time.time_ns() // 1000, spec)
        wait_for(lambda: w.event("update-started"), 20, "the rollback's window to start")
        assert daemon.stop() == 0  # SIGTERM inside the 30 s window
        w.events.clear()
        daemon = Daemon(state, *args)
        with Client(daemon.url) as c:  # traffic, so the resumed window can judge
            for _ in range(5):
                c.infer("cls", {"x": inputs(1)})
        wait_for(lambda: w.state.get("models", {}).get("cls", {}).get("serving") == "1.1.0", 30,
                 "the device back on its desired version after the restart")  # fmt: skip
        # Events go through the outbox, state directly: the event may land a moment after the state.
        wait_for(lambda: w.event("update-started"), 20, "the resumed update's update-started event")
        assert not w.event("update-refused")
        status = json.loads(edgert("status", "--state-dir", str(state), "--json", check=True).stdout)
        assert status["models"]["cls"]["version"] == "1.1.0"
        assert (status["device"], status["group"]) == ("sv2", "grp-sv2")  # not "" for a --device-id daemon
        assert (status["last_rollback"] or {}).get("to") != "1.2.0"  # the interruption was no rollback
    finally:
        ctl.publish("edgert/v1/devices/sv2/desired", b"", qos=1, retain=True).wait_for_publish(5)
        ctl.loop_stop()
        ctl.disconnect()
        daemon.stop()
        w.close()


def test_a_dead_agent_worker_is_restarted_and_a_hopeless_agent_stops_the_watchdog(
    tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path
) -> None:
    """A worker thread that dies (only a bug can do that now; here one is made to exit at once) is
    restarted by the supervisor and counted; one that keeps dying makes supervise() false, which
    the daemon turns into withheld watchdog pings."""
    from edge_runtime.contracts.bundle import load_public_keys
    from edge_runtime.device.agent.session import Agent, AgentConfig
    from edge_runtime.serving.runtime import Runtime
    from edge_runtime.serving.store import ModelStore

    store = ModelStore(tmp_path / "state")
    store.trust(keys / "signing.pub")
    store.install(make_bundle(tmp_path / "v1.edgepkg", keys / "signing.key", "1.0.0"))
    rt = Runtime(store.trusted_keys(), threads=1)
    rt.load(store.bundle_path("cls", "1.0.0"))
    cfg = AgentConfig(url=broker.url, device_id="sv3", group="grp-sv3", fleet_keys=load_public_keys([fleet_key]),
                      target="x86-cpu", username="sv3", password=ACCOUNTS["sv3"], telemetry_interval_s=0.3)  # fmt: skip
    agent = Agent(cfg, rt, store, store.trusted_keys)
    agent.start()
    try:
        wait_for(agent.connected.is_set, 10, "the agent connected")
        assert agent.supervise()  # all alive
        agent.workers.replace("telemetry", lambda: None)  # ends at once, as a thread killed by a bug would
        agent.workers.threads["telemetry"].join(5)
        assert agent.supervise()  # restarted once: still recoverable
        assert agent.records.error_counts().get("dead-telemetry") == 1
        results = []
        for _ in range(6):  # it keeps dying
            agent.workers.threads["telemetry"].join(5)
            results.append(agent.supervise())
        assert results[-1] is False  # too many restarts: the daemon withholds the watchdog now
        assert 'edgert_agent_errors_total{where="dead-telemetry"} 7' in rt.metrics.registry.render()
    finally:
        agent.stop()
        rt.close()
