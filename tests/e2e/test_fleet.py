"""The fleet controller against a real mosquitto and real device agents (simulated devices: each a
real agent with its own state directory, store, outbox and MQTT session over a real Runtime).

Strategies end to end, the automatic abort, shadow and A/B figures checked against what the
devices computed, a controller killed with SIGKILL mid-rollout, and forged commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.bundle import generate_keypair, load_private_key, load_public_keys
from edge_runtime.control import desired_payload, sign
from edge_runtime.fleet.controller import Controller, RolloutParams
from edge_runtime.fleet.db import ControllerDB
from edge_runtime.fleet.link import BrokerAuth, FleetLink
from edge_runtime.fleet.simulate import Simulation, SimSettings
from edge_runtime.runtime import Runtime
from tests.broker import Broker
from tests.conftest import edgert
from tests.fleet_models import DIM, make_bundle

pytestmark = pytest.mark.e2e

DEVICE_PW = "sim-secret"
PREFIXES = {"st": 20, "off": 1, "bad": 12, "exp": 3, "kill": 10, "sec": 5, "bg": 6}
ACCOUNTS = {"controller": "ctl-secret", "intruder": "intruder-secret"} | {
    f"{p}-{i:03d}": DEVICE_PW for p, n in PREFIXES.items() for i in range(n)
}


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("fleet-broker"), ACCOUNTS)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, keys: Path, broker: Broker) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fleet")
    generate_keypair(d / "fleet")
    (d / "ctl.pw").write_text(ACCOUNTS["controller"])
    (d / "dev.pw").write_text(DEVICE_PW)
    k = keys / "signing.key"
    out = {"fleet_key": d / "fleet/signing.key", "fleet_pub": d / "fleet/signing.pub", "ctl_pw": d / "ctl.pw",
           "dev_pw": d / "dev.pw", "root": d}  # fmt: skip
    out["v1"] = make_bundle(d / "cls-1.0.0.edgepkg", k, "1.0.0")
    out["v2"] = make_bundle(d / "cls-2.0.0.edgepkg", k, "2.0.0")
    out["bad"] = make_bundle(d / "cls-3.0.0.edgepkg", k, "3.0.0", variant="bad")
    out["alt"] = make_bundle(d / "cls-4.0.0.edgepkg", k, "4.0.0", seed=1)  # a different model: figures differ
    return out


def settings(broker: Broker, fleet: dict[str, Path], keys: Path, prefix: str, **kw: Any) -> SimSettings:
    return SimSettings(
        url=broker.url, state_root=fleet["root"] / f"devices-{prefix}", group=prefix, trust=keys / "signing.pub",
        fleet_key=fleet["fleet_pub"], password=DEVICE_PW, prefix=prefix, telemetry_interval_s=0.5, **kw,
    )  # fmt: skip


class Ctl:
    """The controller through its Python API (the CLI tests drive the same class)."""

    def __init__(self, broker: Broker, fleet: dict[str, Path], keys: Path, state: Path) -> None:
        self.db = ControllerDB(state)
        auth = BrokerAuth(broker.url, "controller", ACCOUNTS["controller"])
        self.link = FleetLink(auth, load_private_key(fleet["fleet_key"]), self.db)
        self.link.start()
        self.decisions: list[str] = []
        self.c = Controller(self.link, self.db, self.decisions.append)
        self.trust = [keys / "signing.pub"]

    def close(self) -> None:
        self.link.stop()
        self.db.close()


def cli(broker: Broker, fleet: dict[str, Path], state: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return edgert("fleet", "--broker", broker.url, "--key", str(fleet["fleet_key"]), "--state", str(state),
                  "--username", "controller", "--password-file", str(fleet["ctl_pw"]), *args, **kw)  # fmt: skip


def serving(sim: Simulation) -> Counter[str | None]:
    return Counter(sim.serving("cls").values())


# --- canary then staged, 21 devices, one offline during the rollout ----------------------


def test_canary_then_staged_reaches_every_device_and_offline_one_converges(
    broker: Broker, fleet: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    state = tmp_path / "fleet.db"
    # 20 devices in another process, through the CLI; they boot empty and take what the fleet says.
    sim_log = (tmp_path / "sim.log").open("wb")
    sim_proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "fleet", "simulate", "--broker", broker.url, "--devices", "20",
         "--state-root", str(tmp_path / "sim"), "--group", "st", "--prefix", "st", "--trust", str(keys / "signing.pub"),
         "--fleet-key", str(fleet["fleet_pub"]), "--device-password-file", str(fleet["dev_pw"]), "--rate", "10",
         "--telemetry-interval", "0.5"],
        stdout=subprocess.DEVNULL, stderr=sim_log,
    )  # fmt: skip
    # One more device in this process: switched off during the second rollout.
    off_settings = settings(broker, fleet, keys, "off", rate_hz=10)
    off_settings.group = "st"
    off = Simulation(off_settings, 1)
    off.start()
    try:
        for bundle in ("v1", "v2"):
            pub = cli(broker, fleet, state, "publish", str(fleet[bundle]), "--trust", str(keys / "signing.pub"),
                      "--json", check=True)  # fmt: skip
            assert json.loads(pub.stdout)["chunks"] >= 1
        listing = wait_for(
            lambda: (d := json.loads(cli(broker, fleet, state, "devices", "--group", "st", "--json").stdout))
            and sum(x["online"] for x in d["devices"]) == 21 and d,
            60, "21 devices online",
        )  # fmt: skip
        assert {d["id"] for d in listing["devices"]} == {f"st-{i:03d}" for i in range(20)} | {"off-000"}

        # Canary: 10% first (3 of 21), judged, then the rest; devices start empty.
        r = cli(broker, fleet, state, "rollout", "cls:1.0.0", "--group", "st", "--strategy", "canary",
                "--steps", "10,100", "--health-window", "2", "--min-inferences", "8", "--min-devices", "2", "--min-p95-increase-ms", "5",
                "--json", timeout=240)  # fmt: skip
        out = json.loads(r.stdout)
        assert r.returncode == 0, "\n".join(d["message"] for d in out["decisions"])
        assert out["rollout"]["status"] == "completed"
        assert out["group"]["serving"] == {"1.0.0": 21}
        canary = [d for d, x in out["devices"].items() if x["stage"] == 0]
        assert len(canary) == 3 and all(out["devices"][d]["status"] == "passed" for d in canary)

        # Switch one device off, then a staged rollout 25/50/100.
        off.devices[0].stop()
        r = cli(broker, fleet, state, "rollout", "cls:2.0.0", "--group", "st", "--strategy", "staged",
                "--steps", "25,50,100", "--health-window", "2", "--min-inferences", "8", "--min-devices", "3", "--min-p95-increase-ms", "5",
                "--json", timeout=240)  # fmt: skip
        out = json.loads(r.stdout)
        assert r.returncode == 0, "\n".join(d["message"] for d in out["decisions"])
        ro = out["rollout"]
        assert ro["status"] == "completed", out["decisions"]
        assert out["group"]["serving"] == {"2.0.0": 20, "1.0.0": 1}, json.dumps(out, indent=1)
        assert out["group"]["offline_behind"] == ["off-000"]
        stages = Counter(x["stage"] for x in out["devices"].values())
        assert stages == {0: 6, 1: 5, 2: 9}  # 25% of 21 is 6, 50% is 11, then the 9 others online
        assert all(x["status"] == "passed" for x in out["devices"].values())
        assert any("passed" in d["message"] and "stage 1/3" in d["message"] for d in out["decisions"])
        assert "converge on reconnect" in ro["reason"]

        # The device comes back and converges from the retained group desired state.
        off.devices[0].start()
        wait_for(lambda: off.serving("cls")["off-000"] == "2.0.0", 60, "the offline device to converge")
        status = json.loads(cli(broker, fleet, state, "status", "--json", check=True).stdout)
        assert status["group"]["serving"] == {"2.0.0": 21}
        assert status["group"]["offline_behind"] == []
        human = cli(broker, fleet, state, "status", check=True).stdout
        assert "staged cls 1.0.0 -> 2.0.0" in human and "completed" in human
    finally:
        off.stop()
        sim_proc.send_signal(signal.SIGTERM)
        sim_proc.wait(60)
        sim_log.close()
