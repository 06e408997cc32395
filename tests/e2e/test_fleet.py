"""The fleet controller against a real mosquitto and real device agents (simulated devices: each a
real agent with its own state directory, store, outbox and MQTT session over a real Runtime).

Strategies end to end, the automatic abort, shadow and A/B figures checked against what the
devices computed, a controller killed with SIGKILL mid-rollout, and forged commands.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.contracts.bundle import generate_keypair, load_private_key, load_public_keys
from edge_runtime.contracts.signed import desired_payload, sign
from edge_runtime.fleet.controller import Controller, RolloutParams
from edge_runtime.fleet.db import ControllerDB
from edge_runtime.fleet.link import BrokerAuth, FleetLink
from edge_runtime.fleet.simulate import SimSettings, Simulation
from edge_runtime.serving.runtime import Runtime
from tests.broker import Broker
from tests.conftest import edgert, wait_for
from tests.fleet_models import make_bundle

pytestmark = pytest.mark.e2e

DEVICE_PW = "sim-secret"
PREFIXES = {"st": 20, "off": 1, "bad": 12, "exp": 3, "kill": 10, "sec": 5, "bg": 6}
ACCOUNTS = {"controller": "ctl-secret", "intruder": "intruder-secret"} | {
    f"{p}-{i:03d}": DEVICE_PW for p, n in PREFIXES.items() for i in range(n)
}


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
        auth = BrokerAuth(broker.controller_url, "controller", ACCOUNTS["controller"])
        self.link = FleetLink(auth, load_private_key(fleet["fleet_key"]), self.db)
        self.link.start()
        self.decisions: list[str] = []
        self.c = Controller(self.link, self.db, self.decisions.append)
        self.trust = [keys / "signing.pub"]

    def close(self) -> None:
        self.link.stop()
        self.db.close()


def cli(broker: Broker, fleet: dict[str, Path], state: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return edgert("fleet", "--broker", broker.controller_url, "--signing-key", str(fleet["fleet_key"]), "--state", str(state),
                  "--broker-user", "controller", "--broker-password-file", str(fleet["ctl_pw"]), *args, **kw)  # fmt: skip


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
        # What the controller sees comes from the device's retained state: wait for that event,
        # not for the device's runtime (it swaps a moment before it publishes).
        status = wait_for(
            lambda: (s := json.loads(cli(broker, fleet, state, "status", "--json", check=True).stdout))
            and s["group"]["serving"] == {"2.0.0": 21} and s,
            30, "the controller to see every device on 2.0.0",
        )  # fmt: skip
        assert status["group"]["offline_behind"] == []
        human = cli(broker, fleet, state, "status", check=True).stdout
        assert "staged cls 1.0.0 -> 2.0.0" in human and "completed" in human
        # without a broker: what the controller's own state file records
        offline = edgert("fleet", "--state", str(state), "status", check=True).stdout
        assert "staged cls 1.0.0 -> 2.0.0" in offline and "completed" in offline and "pass --broker" in offline
    finally:
        off.stop()
        sim_proc.send_signal(signal.SIGTERM)
        sim_proc.wait(60)
        sim_log.close()


# --- automatic abort -----------------------------------------------------------------


def test_bad_version_is_aborted_fleet_wide_and_moved_devices_return(
    broker: Broker, fleet: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    """3.0.0 gives NaN on devices whose sensors read high and is ~12 ms slower on mid ones."""
    s = settings(broker, fleet, keys, "bad", rate_hz=8, levels=(0.3, 0.55, 0.85), bundles=(fleet["v1"],))
    ctl = Ctl(broker, fleet, keys, tmp_path / "fleet.db")
    with Simulation(s, 12) as sim:
        try:
            ctl.c.publish(fleet["bad"], ctl.trust)
            ctl.c.publish(fleet["v1"], ctl.trust)
            wait_for(lambda: [v.serving("cls") for v in ctl.link.group("bad")] == ["1.0.0"] * 12, 30, "12 devices")
            params = RolloutParams(steps=[50, 100], min_devices=3, max_failure_rate=0.2, health_window=2.5,
                                   min_inferences=10, min_p95_increase_ms=5)  # fmt: skip
            rid = ctl.c.create("cls", "3.0.0", "bad", "staged", params)
            t0 = time.monotonic()
            r = ctl.c.drive(rid)
            assert r.status == "aborted", ctl.decisions
            # Either device verdicts (NaN/Inf, p95) or the fleet-wide error rate stopped it.
            assert ("failed" in r.reason and "over the 20% allowed" in r.reason) or "error rate" in r.reason, r.reason
            moved = set(r.devices)
            assert len(moved) == 6  # the first stage only: the second never started
            assert r.from_version == "1.0.0"
            assert any(m.startswith("ABORT:") for m in ctl.decisions)
            # Every device, moved or not, serves 1.0.0 again; none stays on 3.0.0.
            wait_for(lambda: serving(sim) == Counter({"1.0.0": 12}), 60, f"all back on 1.0.0: {serving(sim)}")
            took = time.monotonic() - t0
            assert took < 60
            decisions = ctl.db.decisions(rid)
            assert any("rollback published" in d["message"] for d in decisions)
            # The devices that passed were moved back by the signed rollback, not by themselves.
            passed = [dev for dev, d in r.devices.items() if d["status"] == "passed"]
            for dev in passed:
                outcome = ctl.link.view(dev).model("cls").outcome  # type: ignore[union-attr]
                assert outcome is not None and outcome.version == "1.0.0" and outcome.outcome == "committed"
        finally:
            ctl.close()


# --- shadow and A/B --------------------------------------------------------------------


def _expected(fleet: dict[str, Path], keys: Path, frames: list[np.ndarray]) -> dict[str, np.ndarray]:
    """What 1.0.0 and 4.0.0 compute on these frames, computed here, apart from the devices."""
    rt = Runtime(load_public_keys([keys / "signing.pub"]))
    out = {}
    for tag, version in (("v1", "1.0.0"), ("alt", "4.0.0")):
        b = make_bundle(fleet["root"] / f"copy-{version}.edgepkg", keys / "signing.key", version,
                        seed=1 if tag == "alt" else 0)  # fmt: skip
        h = rt.load(b)
        out[version] = np.concatenate([rt.infer("cls", f)["logits"] for f in frames])
        rt.unload(h.name)
    rt.close()
    return out


def test_shadow_and_ab_figures_match_what_devices_computed(
    broker: Broker, fleet: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    s = settings(broker, fleet, keys, "exp", rate_hz=0, bundles=(fleet["v1"],))  # the test sends the traffic
    ctl = Ctl(broker, fleet, keys, tmp_path / "fleet.db")
    with Simulation(s, 3) as sim:
        try:
            ctl.c.publish(fleet["alt"], ctl.trust)
            wait_for(lambda: sum(v.online for v in ctl.link.group("exp")) == 3, 30, "3 devices online")
            # The test sends traffic only while it observes: after a promotion the devices' windows are
            # idle, and idle devices pass only because the operator says so (--unjudged pass).
            params = RolloutParams(min_devices=2, health_window=1.0, min_inferences=1, unjudged="pass")

            # Shadow: 4.0.0 runs on every frame 1.0.0 serves; nothing it computes is served.
            rid = ctl.c.create("cls", "4.0.0", "exp", "shadow", params)
            assert ctl.c.drive(rid).status == "observing"
            wait_for(lambda: all(d.runtime.get("cls").experiment for d in sim.devices), 30, "shadow loaded")  # type: ignore[union-attr]
            frames: list[np.ndarray] = []
            for d in sim.devices:
                for _ in range(40):
                    f = d.frame([1, 64], "float32")
                    frames.append(f)
                    out = d.runtime.infer("cls", f)  # type: ignore[union-attr]
                    assert out["logits"].shape == (1, 4)
            exp = _expected(fleet, keys, frames)
            r = ctl.c.resolve(rid)
            figs = wait_for(
                lambda: (f := ctl.c.experiment_figures(r)) and (f["shadow"] or {}).get("rows") == 120 and f,
                30, "120 compared rows reported",
            )  # fmt: skip
            agree = int((exp["1.0.0"].argmax(1) == exp["4.0.0"].argmax(1)).sum())
            assert figs["shadow"]["agree_top1"] == agree and figs["shadow"]["classified"] == 120
            assert figs["shadow"]["dropped"] == 0
            assert figs["shadow"]["mean_abs_diff"] == pytest.approx(
                np.abs(exp["1.0.0"] - exp["4.0.0"]).mean(), rel=1e-4
            )
            assert figs["shadow"]["max_abs_diff"] == pytest.approx(np.abs(exp["1.0.0"] - exp["4.0.0"]).max(), rel=1e-4)
            for version in ("1.0.0", "4.0.0"):
                top1 = Counter(str(c) for c in exp[version].argmax(1))
                assert figs["variants"][version]["top1"] == dict(top1)
                assert figs["variants"][version]["rows"] == 120 and figs["variants"][version]["devices"] == 3
            assert serving(sim) == Counter({"1.0.0": 3})  # shadow serves nothing
            assert ctl.c.abort(rid, "dropped by the operator").status == "aborted"
            wait_for(lambda: not any(d.runtime.get("cls").experiment for d in sim.devices), 30, "shadow dropped")  # type: ignore[union-attr]

            # A/B: 30% of each device's requests are answered by 4.0.0; the answers say which.
            params.split = 30.0
            rid = ctl.c.create("cls", "4.0.0", "exp", "ab", params)
            assert ctl.c.drive(rid).status == "observing"
            wait_for(lambda: all(d.runtime.get("cls").experiment for d in sim.devices), 30, "variant loaded")  # type: ignore[union-attr]
            seen: dict[str, list[int]] = {"1.0.0": [], "4.0.0": []}
            for d in sim.devices:
                for _ in range(50):
                    sub = d.runtime.submit("cls", {"x": d.frame([1, 64], "float32")})  # type: ignore[union-attr]
                    seen[sub.version].append(int(sub.result(10)["logits"].argmax()))
            assert len(seen["4.0.0"]) == 3 * 15  # exactly 30% of 50 per device
            r = ctl.c.resolve(rid)
            figs = wait_for(
                lambda: (f := ctl.c.experiment_figures(r))
                and sum(v["rows"] for v in f["variants"].values()) == 150 and f,
                30, "150 A/B rows reported",
            )  # fmt: skip
            for version, classes in seen.items():
                assert figs["variants"][version]["rows"] == len(classes)
                assert figs["variants"][version]["top1"] == dict(Counter(str(c) for c in classes))
                assert figs["variants"][version]["error_rate"] == 0
            status = cli(broker, fleet, tmp_path / "fleet.db", "status", str(rid), check=True).stdout
            assert "ab: per-version figures" in status and "4.0.0" in status

            # Promote: every device moves to 4.0.0 through its health window.
            ctl.c.promote(rid)
            r = ctl.c.drive(rid)
            assert r.status == "completed", ctl.decisions
            assert serving(sim) == Counter({"4.0.0": 3})
            assert not any(d.runtime.get("cls").experiment for d in sim.devices)  # type: ignore[union-attr]
        finally:
            ctl.close()


# --- blue-green ----------------------------------------------------------------------


def test_blue_green_stages_warm_switches_together_and_switches_back(
    broker: Broker, fleet: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    s = settings(broker, fleet, keys, "bg", rate_hz=8, bundles=(fleet["v1"],))
    ctl = Ctl(broker, fleet, keys, tmp_path / "fleet.db")
    with Simulation(s, 6) as sim:
        try:
            # URL only (as from S3-compatible storage): no chunks on the broker.
            info = ctl.c.publish(fleet["v2"], ctl.trust, url=fleet["v2"].as_uri(), chunks=False)
            assert info["chunks"] == 0 and info["url"].startswith("file://")
            wait_for(lambda: sum(v.online for v in ctl.link.group("bg")) == 6, 30, "6 devices online")
            params = RolloutParams(min_devices=3, health_window=1.5, min_inferences=5, min_p95_increase_ms=5)
            rid = ctl.c.create("cls", "2.0.0", "bg", "blue-green", params)
            r = ctl.c.drive(rid)
            assert r.status == "completed", ctl.decisions
            assert any("warm; the whole group switches" in m for m in ctl.decisions)
            assert serving(sim) == Counter({"2.0.0": 6})
            # 1.0.0 stays loaded and warm beside it: switching back loads nothing.
            assert all(d.runtime.get("cls").standby.version == "1.0.0" for d in sim.devices)  # type: ignore[union-attr]
            warm = [d.runtime.get("cls").standby for d in sim.devices]  # type: ignore[union-attr]
            assert ctl.c.rollback(rid).status == "rolled-back"
            wait_for(lambda: serving(sim) == Counter({"1.0.0": 6}), 30, "switch back")
            # The very objects that were warm serve now: nothing was loaded to switch back.
            assert all(d.runtime.get("cls").current is w for d, w in zip(sim.devices, warm, strict=True))  # type: ignore[union-attr]
        finally:
            ctl.close()


# --- controller killed mid-rollout -------------------------------------------------------


def test_controller_killed_mid_rollout_resumes_and_finishes(
    broker: Broker, fleet: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    state = tmp_path / "fleet.db"
    s = settings(broker, fleet, keys, "kill", rate_hz=8, bundles=(fleet["v1"],))
    with Simulation(s, 10) as sim:
        cli(broker, fleet, state, "publish", str(fleet["v2"]), "--trust", str(keys / "signing.pub"), check=True)
        args = ["fleet", "--broker", broker.controller_url, "--signing-key", str(fleet["fleet_key"]), "--state", str(state),
                "--broker-user", "controller", "--broker-password-file", str(fleet["ctl_pw"]), "rollout", "cls:2.0.0",
                "--group", "kill", "--strategy", "staged", "--steps", "20,60,100", "--health-window", "2",
                "--min-inferences", "8", "--min-devices", "2", "--min-p95-increase-ms", "5"]  # fmt: skip
        wait_for(lambda: "10 devices" in cli(broker, fleet, state, "devices", "--group", "kill").stdout
                 and sum(d.agent is not None and d.agent.connected.is_set() for d in sim.devices) == 10,
                 30, "10 devices")  # fmt: skip
        proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        db = ControllerDB(state)
        try:
            # Kill it for real once the second stage has moved devices, in the middle of their window.
            wait_for(lambda: any("stage 2/3 (60%): moved" in d["message"] for r in db.rollouts()
                                 for d in db.decisions(r.id)), 90, "stage 2 to start")  # fmt: skip
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
            r = db.rollouts()[-1]
            assert r.status == "running" and r.phase == 1
            moved_before = set(r.devices)
            res = cli(broker, fleet, state, "resume", "--json", timeout=180)
            out = json.loads(res.stdout)
            assert res.returncode == 0, "\n".join(d["message"] for d in out["decisions"])
            assert out["rollout"]["status"] == "completed"
            assert moved_before <= set(out["devices"])
            assert any("controller resumed" in d["message"] for d in out["decisions"])
            assert out["group"]["serving"] == {"2.0.0": 10}
            assert serving(sim) == Counter({"2.0.0": 10})
            assert Counter(d["stage"] for d in out["devices"].values()) == {0: 2, 1: 4, 2: 4}
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            db.close()


# --- forged and unauthorized commands ----------------------------------------------------


def test_forged_replayed_and_unauthorized_commands_are_ignored_by_every_device(
    broker: Broker, fleet: dict[str, Path], keys: Path, other_keys: Path, tmp_path: Path
) -> None:
    s = settings(broker, fleet, keys, "sec", rate_hz=4, bundles=(fleet["v1"],))
    ctl = Ctl(broker, fleet, keys, tmp_path / "fleet.db")
    with Simulation(s, 5) as sim:
        try:
            ref = ctl.c.publish(fleet["v2"], ctl.trust)
            wait_for(lambda: sum(v.online for v in ctl.link.group("sec")) == 5, 30, "5 devices online")
            bundle = ctl.db.bundle("cls", "2.0.0")
            assert bundle is not None
            models = {"cls": {"version": "2.0.0", "bundle": bundle.model_dump(exclude_none=True)}}
            # 1. A genuine desired state the devices accept (to replay later): 1.0.0, what they run.
            ctl.link.desired("group:sec", {"cls": {"version": "1.0.0"}})
            wait_for(lambda: all(v.state and sum(v.state.desired_seq.values()) for v in ctl.link.group("sec")),
                     20, "devices to take the genuine state")  # fmt: skip
            genuine = ctl.db.messages(["group:sec"])[0][2]
            ctl.link.desired("group:sec", {"cls": {"version": "1.0.0"}, "other": {}})
            c = broker.client("controller")
            intruder = broker.client("intruder")
            try:
                topic = "edgert/v1/groups/sec/desired"
                seq = int(time.time() * 1000) + 10_000_000
                forged = sign(desired_payload("group:sec", seq, models), load_private_key(other_keys / "signing.key"))
                c.publish(topic, forged, qos=1).wait_for_publish(5)  # signed by a key the fleet does not trust
                c.publish(topic, genuine, qos=1).wait_for_publish(5)  # replayed: a real signature, an old seq
                unsigned = json.dumps({"payload": desired_payload("group:sec", seq + 1, models)}).encode()
                c.publish(topic, unsigned, qos=1).wait_for_publish(5)
                for dev in ("sec-000", "sec-003"):  # signed for another scope, sent to a device
                    other = sign(desired_payload("group:sec", seq + 2, models), load_private_key(fleet["fleet_key"]))
                    c.publish(f"edgert/v1/devices/{dev}/desired", other, qos=1).wait_for_publish(5)
                # An account that may not publish there at all: the broker's ACL drops it.
                good = sign(desired_payload("group:sec", seq + 3, models), load_private_key(fleet["fleet_key"]))
                acks: list[Any] = []
                intruder.on_publish = lambda cl, u, mid, rc, props: acks.append(rc)
                intruder.publish(topic, good, qos=1).wait_for_publish(5)
                wait_for(lambda: acks, 5, "the broker's answer to the intruder")
                assert acks[0].value == 135, acks  # MQTT 5 "Not authorized": dropped by the ACL, by its reason code
            finally:
                for client in (c, intruder):
                    client.disconnect()
                    client.loop_stop()

            def refused(dev: str) -> dict[str, int]:
                v = ctl.link.view(dev)
                return dict(v.state.control_refused) if v and v.state else {}

            wait_for(lambda: all({"forged", "replayed", "unsigned"} <= set(refused(d.id)) for d in sim.devices),
                     20, "every device to refuse them")  # fmt: skip
            assert all("wrong-scope" in refused(d) for d in ("sec-000", "sec-003"))
            time.sleep(2)  # give any wrongly accepted update the time to start
            assert serving(sim) == Counter({"1.0.0": 5})
            assert all(d.agent is not None and not d.agent.rejected for d in sim.devices)
            assert ref["version"] == "2.0.0"
            # Signed but malformed: an experiment of an unknown kind is refused as a whole message
            # by the typed contract (counted as "malformed"), before anything moves: nothing is
            # downloaded or loaded for it, and the device keeps its accepted desired state.
            before = {d.id: refused(d.id).get("malformed", 0) for d in sim.devices}
            ctl.link.desired(
                "group:sec",
                {"cls": {"version": "1.0.0", "experiment": {"kind": "bogus", "version": "2.0.0", "bundle": bundle}}},  # type: ignore[dict-item]
            )
            wait_for(lambda: all(refused(d.id).get("malformed", 0) > before[d.id] for d in sim.devices), 20,
                     "every device to refuse the malformed experiment")  # fmt: skip
            assert all(d.runtime.get("cls").experiment is None for d in sim.devices)  # type: ignore[union-attr]
            assert not any((d.root / "downloads" / bundle.sha256).exists() for d in sim.devices)
            assert serving(sim) == Counter({"1.0.0": 5})
        finally:
            ctl.close()
