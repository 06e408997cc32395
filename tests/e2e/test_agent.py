"""The MQTT agent against a real mosquitto: verified updates over MQTT chunks under load,
automatic rollback of misbehaving versions, refusals, hostile control traffic, broker ACLs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.contracts.bundle import load_private_key
from edge_runtime.contracts.client import Client
from edge_runtime.fleet import bundle_ref, publish_bundle, publish_desired
from tests.broker import Broker
from tests.conftest import Daemon, edgert
from tests.fleet_models import inputs, make_bundle

pytestmark = pytest.mark.e2e

ACCOUNTS = {"controller": "ctl-secret", "dev1": "dev1-secret", "dev2": "dev2-secret"}
HEALTH = {"window_s": 3, "min_inferences": 30, "min_baseline": 20}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"), ACCOUNTS)
    yield b
    b.stop()


class Device:
    """A real daemon with its agent, a load of real requests, and the controller's view."""

    def __init__(
        self,
        tmp: Path,
        broker: Broker,
        keys: Path,
        fleet: Path,
        device: str = "dev1",
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp, self.broker, self.keys, self.device = tmp, broker, keys, device
        self.state = tmp / f"state-{device}"
        v1 = make_bundle(tmp / "cls-1.0.0.edgepkg", keys / "signing.key", "1.0.0")
        edgert("install", str(v1), "--state-dir", str(self.state), "--trust", str(keys / "signing.pub"), check=True)
        pw = tmp / f"{device}.pw"
        pw.write_text(ACCOUNTS[device])
        self.events: list[dict[str, Any]] = []
        self.ctl = broker.client("controller")
        self.ctl.on_message = lambda c, u, m: self.events.append(json.loads(m.payload)) if m.payload else None
        self.ctl.subscribe(f"edgert/v1/devices/{device}/events", 1)
        for topic in (f"edgert/v1/devices/{device}/desired", "edgert/v1/groups/g1/desired"):
            self.ctl.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # no state left by other tests
        self.daemon = Daemon(self.state, "--broker", broker.url, "--device-id", device, "--group", "g1",
                             "--fleet-key", str(fleet / "signing.pub"), "--broker-password-file", str(pw),
                             "--telemetry-interval", "0.5", env=env)  # fmt: skip
        self.fleet = fleet
        self.errors: list[Exception] = []
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._load, daemon=True)
        self._thread.start()

    def _load(self) -> None:
        x = inputs(64)
        with Client(self.daemon.url) as c:
            i = 0
            while not self._stop.is_set():
                try:
                    c.infer("cls", {"x": x[i % 64 : i % 64 + 1]})
                    self.served += 1
                except Exception as e:
                    self.errors.append(e)
                i += 1
                time.sleep(0.005)

    def restart(self) -> None:
        """Start the daemon again on the same state dir, without any fault injection."""
        self.daemon.log.close()
        self.daemon = Daemon(self.state, *self.daemon.proc.args[8:])  # type: ignore[index]  # past --state-dir and --port

    def version(self) -> str:
        return str(Client(self.daemon.url).metadata("cls")["versions"][0])

    def wait_event(self, kind: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in list(self.events):
                if e.get("data", {}).get("event") == kind:
                    return e["data"]  # type: ignore[no-any-return]
            time.sleep(0.1)
        got = [e.get("data") for e in self.events]
        raise AssertionError(f"no {kind} event in {timeout} s; got {json.dumps(got)[:1500]}")

    def close(self) -> int:
        self._stop.set()
        self._thread.join()
        code = self.daemon.stop()
        self.ctl.loop_stop()
        self.ctl.disconnect()
        return code


@pytest.fixture()
def device(tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path) -> Iterator[Device]:
    d = Device(tmp_path, broker, keys, fleet_key)
    yield d
    assert d.close() == 0


def _offer(d: Device, fleet_key: Path, version: str, variant: str = "good", **extra: Any) -> dict[str, Any]:
    seq = time.time_ns() // 1000  # only grows, across tests sharing the broker too
    bundle = make_bundle(d.tmp / f"cls-{version}-{variant}.edgepkg", d.keys / "signing.key", version, variant)
    ref = publish_bundle(d.ctl, bundle, chunk_size=4096)  # many chunks: exercises reassembly
    publish_desired(d.ctl, load_private_key(fleet_key / "signing.key"), d.device, seq,
                    {"cls": {"version": version, "bundle": ref, "health": HEALTH, **extra}})  # fmt: skip
    return ref


def test_update_over_mqtt_chunks_under_load(device: Device, fleet_key: Path) -> None:
    time.sleep(1.0)  # baseline traffic on 1.0.0
    _offer(device, fleet_key, "1.1.0")
    committed = device.wait_event("update-committed")
    assert committed["to"] == "1.1.0" and committed["from"] == "1.0.0"
    assert device.version() == "1.1.0"
    assert not device.errors, device.errors[:3]  # zero failed requests across download, swap and window
    status = json.loads(edgert("status", "--state-dir", str(device.state), "--json", check=True).stdout)
    assert status["models"]["cls"]["version"] == "1.1.0" and status["models"]["cls"]["pending"] is None
    assert "1.0.0" in status["models"]["cls"]["staged"]


@pytest.mark.parametrize(
    "variant,reason",
    [
        ("nan", "NaN/Inf"),
        ("slow", "p95 latency"),
        ("crash", "fail"),
        ("shifted", "output drift"),
        ("crash-on-load", "failed to load"),
    ],
)
def test_misbehaving_version_rolls_back(device: Device, fleet_key: Path, variant: str, reason: str) -> None:
    time.sleep(1.5)
    _offer(device, fleet_key, "1.1.0", variant)
    rolled = device.wait_event("update-rolled-back")
    assert rolled["to"] == "1.1.0" and reason in rolled["reason"], rolled["reason"]
    assert device.version() == "1.0.0"
    status = json.loads(edgert("status", "--state-dir", str(device.state), "--json", check=True).stdout)
    assert status["models"]["cls"]["version"] == "1.0.0"
    assert reason in status["last_rollback"]["reason"] and status["last_rollback"]["from"] == "1.1.0"
    if variant not in ("crash",):  # a crashing version fails the requests it was given, and only those
        assert not device.errors


def test_device_cannot_publish_as_another(broker: Broker) -> None:
    seen: list[bytes] = []
    ctl = broker.client("controller")
    ctl.on_message = lambda c, u, m: seen.append(m.payload)
    ctl.subscribe("edgert/v1/devices/dev2/#", 1)
    time.sleep(0.3)
    dev1 = broker.client("dev1")
    acks: list[Any] = []
    dev1.on_publish = lambda c, u, mid, rc, props: acks.append(rc)
    dev1.publish("edgert/v1/devices/dev2/telemetry", b'{"forged": true}', qos=1).wait_for_publish(5)
    dev1.publish("edgert/v1/devices/dev1/telemetry", b'{"own": true}', qos=1).wait_for_publish(5)
    dev1.publish("edgert/v1/groups/g1/desired", b'{"forged": true}', qos=1).wait_for_publish(5)
    time.sleep(0.5)
    assert seen == []
    # MQTT 5: 135 "Not authorized" for both forgeries; the device's own topic succeeds
    # (0, or 16 "no matching subscribers", both successes).
    assert acks[0].value == 135 and not acks[1].is_failure and acks[2].value == 135, acks
    for c in (ctl, dev1):
        c.loop_stop()
        c.disconnect()
    # Wrong passwords are refused too.
    with pytest.raises(AssertionError, match="could not connect"):
        broker.accounts["dev2"] = "wrong"
        try:
            broker.client("dev2")
        finally:
            broker.accounts["dev2"] = ACCOUNTS["dev2"]


def test_bundle_ref_shape(tmp_path: Path, keys: Path) -> None:
    b = make_bundle(tmp_path / "b.edgepkg", keys / "signing.key", "1.0.0")
    ref = bundle_ref(b, chunk_size=1000)
    assert ref.size == b.stat().st_size and len(ref.chunks) == -(-ref.size // 1000)


def _desired(d: Device, fleet_key: Path, models: dict[str, Any]) -> None:
    publish_desired(d.ctl, load_private_key(fleet_key / "signing.key"), d.device, time.time_ns() // 1000, models)


@pytest.mark.parametrize("case", ["tampered", "wrong-key", "wrong-target", "downgrade", "truncated", "wrong-hash"])
def test_bad_bundles_refused_before_touching_active(
    device: Device, fleet_key: Path, other_keys: Path, case: str
) -> None:
    import tarfile

    keys = device.keys
    version = "0.9.0" if case == "downgrade" else "1.1.0"
    b = make_bundle(device.tmp / "cand.edgepkg", (other_keys if case == "wrong-key" else keys) / "signing.key", version,
                    target="arm64-cpu" if case == "wrong-target" else "x86-cpu")  # fmt: skip
    if case == "tampered":  # flip the model, repack: hashes no longer match the signed manifest
        with tarfile.open(b) as t:
            members = [(m, t.extractfile(m).read()) for m in t]  # type: ignore[union-attr]
        with tarfile.open(b, "w:gz") as t:
            for m, data in members:
                if m.name == "model.onnx":
                    data = data[:-8] + b"\x00" * 8
                t.addfile(m, __import__("io").BytesIO(data))
    data = b.read_bytes()
    if case == "truncated":
        b.write_bytes(data[: len(data) // 2])
    ref = bundle_ref(b, chunked=False, url=b.resolve().as_uri())
    if case == "wrong-hash":
        ref = ref.model_copy(update={"sha256": "0" * 64})
    _desired(device, fleet_key, {"cls": {"version": version, "bundle": ref}})
    refused = device.wait_event("update-refused")
    expected = {"tampered": "sha256 mismatch", "wrong-key": "does not verify", "wrong-target": "targets arm64-cpu",
                "downgrade": "not newer", "truncated": "truncated", "wrong-hash": "does not match"}[case]  # fmt: skip
    assert expected in refused["reason"], refused["reason"]
    assert device.version() == "1.0.0" and not device.errors
    assert not (device.state / "models" / "cls" / f"{version}.edgepkg").exists()


def test_signed_downgrade_is_applied(device: Device, fleet_key: Path) -> None:
    time.sleep(1.0)
    _offer(device, fleet_key, "0.9.0", allow_downgrade=True)
    assert device.wait_event("update-committed")["to"] == "0.9.0"
    assert device.version() == "0.9.0"


def test_hostile_control_traffic(device: Device, fleet_key: Path, other_keys: Path, broker: Broker) -> None:
    from edge_runtime.contracts.signed import canonical, desired_payload, sign

    topic = "edgert/v1/devices/dev1/desired"
    good = sign(desired_payload("dev1", time.time_ns() // 1000, {}), load_private_key(fleet_key / "signing.key"))
    forged = sign(desired_payload("dev1", time.time_ns() // 1000 + 5, {}), load_private_key(other_keys / "signing.key"))
    other_scope = sign(
        desired_payload("dev2", time.time_ns() // 1000 + 6, {}), load_private_key(fleet_key / "signing.key")
    )
    unsigned = json.dumps({"payload": json.loads(canonical(desired_payload("dev1", 10**18, {})))}).encode()
    old = sign(desired_payload("dev1", 1, {}), load_private_key(fleet_key / "signing.key"))
    for payload in (good, good, unsigned, forged, other_scope, b"{not json", b"x" * 300_000, old):
        device.ctl.publish(topic, payload, qos=1, retain=False).wait_for_publish(5)
        time.sleep(0.05)
    deadline = time.monotonic() + 10
    want = {"unsigned": 1, "forged": 1, "wrong-scope": 1, "malformed": 1, "oversized": 1, "replayed": 1}
    while time.monotonic() < deadline:
        status = json.loads(edgert("status", "--state-dir", str(device.state), "--json", check=True).stdout)
        if status["control_refused"] == want:
            break
        time.sleep(0.3)
    assert status["control_refused"] == want  # the duplicate of `good` was applied once, silently
    assert device.version() == "1.0.0" and not device.errors and Client(device.daemon.url).ready()


@pytest.mark.parametrize("step", ["download", "verify", "write", "rename", "activate", "health"])
def test_kill9_at_every_update_step(tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path, step: str) -> None:
    from edge_runtime.contracts.bundle import load_public_keys as pubs
    from edge_runtime.contracts.bundle import read_bundle

    d = Device(tmp_path, broker, keys, fleet_key, env={"EDGERT_FAULT_KILL_AT": step})
    try:
        time.sleep(1.0)
        _offer(d, fleet_key, "1.1.0")
        assert d.daemon.proc.wait(60) == -9  # killed for real at that step
        d._stop.set()
        d._thread.join()
        active = (d.state / "models/cls/active").read_text()
        assert active in ("1.0.0", "1.1.0")  # never torn, never absent
        d.events.clear()
        d.restart()  # no fault this time: recovery, then the agent converges again
        served = d.version()
        # Each is exactly the old or the new version. They may differ for an instant: the agent
        # converges right after the restart, and the pointer switches just before the hot swap.
        assert served in ("1.0.0", "1.1.0") and (d.state / "models/cls/active").read_text() in ("1.0.0", "1.1.0")
        if step == "health":
            assert served == "1.0.0"  # killed inside the window: the new version was never committed
            status = json.loads(edgert("status", "--state-dir", str(d.state), "--json", check=True).stdout)
            assert "health window" in status["last_rollback"]["reason"]
        for v in ("1.0.0", "1.1.0"):  # whatever is on disk verifies completely
            p = d.state / "models/cls" / f"{v}.edgepkg"
            if p.exists():
                read_bundle(p, pubs([keys / "signing.pub"]))
        d._stop.clear()
        d._thread = threading.Thread(target=d._load, daemon=True)
        d._thread.start()
        if step == "health":
            time.sleep(3)
            assert d.version() == "1.0.0"  # a version that died in its window is not retried by itself
            assert d.wait_event("update-rolled-back")["reason"].endswith("health window")
            _offer(d, fleet_key, "1.1.0")  # the operator signs the desired state again
        d.wait_event("update-committed", timeout=60)  # the retained desired state is met after all
        assert d.version() == "1.1.0" == (d.state / "models/cls/active").read_text()
        assert not list((d.state / "models/cls").glob(".*tmp*"))  # nothing half-written left behind
    finally:
        assert d.close() == 0


def test_chunk_transfer_resumes_after_kill9(tmp_path: Path, broker: Broker, keys: Path, fleet_key: Path) -> None:
    """Half the chunks arrive, the daemon is killed, the rest arrive after the restart: the
    chunks already on disk are kept and the update completes."""
    d = Device(tmp_path, broker, keys, fleet_key)
    try:
        bundle = make_bundle(d.tmp / "cls-1.1.0.edgepkg", keys / "signing.key", "1.1.0")
        data = bundle.read_bytes()
        ref = bundle_ref(bundle, chunk_size=2048)
        n = len(ref.chunks)
        first = n // 2
        for i in range(first):  # only the first half is on the broker yet
            d.ctl.publish(
                f"edgert/v1/bundles/{ref.sha256}/{i}", data[i * 2048 : (i + 1) * 2048], qos=1, retain=True
            ).wait_for_publish(5)
        _desired(d, fleet_key, {"cls": {"version": "1.1.0", "bundle": ref, "health": HEALTH}})
        chunk_dir = d.state / "downloads" / ref.sha256
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(list(chunk_dir.glob("*.chunk"))) < first:
            time.sleep(0.1)
        assert len(list(chunk_dir.glob("*.chunk"))) == first
        d.daemon.proc.kill()
        assert d.daemon.proc.wait(10) == -9
        d._stop.set()
        d._thread.join()
        d.events.clear()
        d.restart()
        assert len(list(chunk_dir.glob("*.chunk"))) == first  # kept across the kill
        for i in range(first, n):
            d.ctl.publish(
                f"edgert/v1/bundles/{ref.sha256}/{i}", data[i * 2048 : (i + 1) * 2048], qos=1, retain=True
            ).wait_for_publish(5)
        d._stop.clear()
        d._thread = threading.Thread(target=d._load, daemon=True)
        d._thread.start()
        assert d.wait_event("update-committed")["to"] == "1.1.0"
        assert d.version() == "1.1.0" and not chunk_dir.exists()
    finally:
        assert d.close() == 0


def test_group_desired_state_converges(device: Device, fleet_key: Path) -> None:
    time.sleep(1.0)
    bundle = make_bundle(device.tmp / "cls-1.2.0.edgepkg", device.keys / "signing.key", "1.2.0")
    ref = publish_bundle(device.ctl, bundle, chunk_size=8192)
    publish_desired(device.ctl, load_private_key(fleet_key / "signing.key"), "group:g1", time.time_ns() // 1000,
                    {"cls": {"version": "1.2.0", "bundle": ref, "health": HEALTH}})  # fmt: skip
    assert device.wait_event("update-committed")["to"] == "1.2.0"
    state = json.loads(edgert("status", "--state-dir", str(device.state), "--json", check=True).stdout)
    assert "group:g1" in state["desired_seq"] and state["models"]["cls"]["version"] == "1.2.0"
