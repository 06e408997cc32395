"""Unattended survival, caused for real: hostile messages on every topic a device or the
controller reads, corrupt and missing state files, a read-only state dir, a full disk. In each
case the device (a real `edgert serve` process) keeps serving, stays reachable for the fleet,
counts what it refused, and recovers by itself once the cause is gone."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.contracts.bundle import generate_keypair, load_private_key
from edge_runtime.contracts.client import Client
from edge_runtime.contracts.signed import desired_payload, sign
from edge_runtime.fleet import publish_bundle, publish_desired
from tests.broker import Broker
from tests.conftest import Daemon, edgert
from tests.fleet_models import inputs, make_bundle

pytestmark = pytest.mark.e2e

ACCOUNTS = {"controller": "ctl-secret", "sv1": "sv1-secret", "sv2": "sv2-secret", "sv3": "sv3-secret"}
HEALTH = {"window_s": 1, "min_inferences": 0, "min_baseline": 1000}
NESTED = b"[" * 1500 + b"]" * 1500  # 3 kB; json.loads alone raises RecursionError on it


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"), ACCOUNTS)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def fleet_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fleet")
    generate_keypair(d)
    return d


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def serve_args(broker: Broker, device: str, fleet_key: Path, pw: Path) -> list[str]:
    return ["--mqtt", broker.url, "--device-id", device, "--group", f"grp-{device}",
            "--fleet-key", str(fleet_key / "signing.pub"), "--mqtt-password-file", str(pw),
            "--telemetry-interval", "0.3"]  # fmt: skip


def password(tmp: Path, device: str) -> Path:
    pw = tmp / f"{device}.pw"
    pw.write_text(ACCOUNTS[device])
    return pw


def install_v1(tmp: Path, state: Path, keys: Path) -> None:
    edgert("install", str(make_bundle(tmp / "v1.edgepkg", keys / "signing.key", "1.0.0")), "--state-dir", str(state),
           "--trust", str(keys / "signing.pub"), check=True)  # fmt: skip


def mount_tmpfs(disk: Path, size: str = "4m") -> None:
    """A small real file system to fill; skipped, with the reason, where mounting is not allowed."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True,
                             text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root/CAP_SYS_ADMIN): {mounted.stderr.strip()}")


def fill(filler: Path) -> None:
    """Fill the file system to its last byte (raw writes: a buffered close could itself fail)."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


class Watcher:
    """The controller's account, listening to one device's retained state and events."""

    def __init__(self, broker: Broker, device: str) -> None:
        self.state: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.telemetry_seqs: list[int] = []
        self.c = broker.client("controller")
        self.c.on_message = self._on
        self.c.subscribe(f"edgert/v1/devices/{device}/#", 1)

    def _on(self, c: Any, u: Any, m: Any) -> None:
        if not m.payload:
            return
        kind = m.topic.rsplit("/", 1)[1]
        try:
            data = json.loads(m.payload)
        except (ValueError, RecursionError):  # the hostile messages themselves (this client reads them too)
            return
        if kind == "state":
            self.state = data
        elif kind == "events":
            self.events.append(data["data"])
        elif kind == "telemetry":
            self.telemetry_seqs.append(int(data["seq"]))

    def event(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == kind), None)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def infer_ok(url: str) -> bool:
    with Client(url) as c:
        y = c.infer("cls", {"x": inputs(1)})["logits"]
    return bool(np.isfinite(y).all())


def health_ok(url: str) -> bool:
    with urllib.request.urlopen(url + "/v2/health/ready", timeout=5) as r:
        return r.status == 200


# --- 1. one message never kills a thread ------------------------------------------------------


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
        cmd = ["fleet", "--broker", broker.controller_url, "--username", "controller", "--password-file", str(pw),
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


# --- 2. start-up and state files degrade, never brick -----------------------------------------


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


# --- 3. disk is finite --------------------------------------------------------------------------


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


# --- 4. the HTTP daemon cannot be locked out ----------------------------------------------------


def _get(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_idle_slow_and_flooding_clients_cannot_lock_the_api_out(tmp_path: Path, keys: Path) -> None:
    import socket
    from concurrent.futures import ThreadPoolExecutor

    state = tmp_path / "state"
    install_v1(tmp_path, state, keys)
    config = tmp_path / "edgert.yaml"
    config.write_text(
        "max_connections: 4\nhttp_idle_timeout_s: 60\nhttp_request_timeout_s: 2\nmax_json_body_bytes: 4096\n"
    )
    daemon = Daemon(state, "--config", str(config))
    host, port = "127.0.0.1", daemon.port
    held: list[socket.socket] = []
    try:
        # The old lock-out: idle keep-alive connections up to the cap. Health still answers at once
        # (the longest-idle connection makes room).
        held = [socket.create_connection((host, port)) for _ in range(4)]
        time.sleep(0.3)
        t0 = time.monotonic()
        assert _get(daemon.url + "/v2/health/ready") == 200 and time.monotonic() - t0 < 2
        for s in held:
            s.close()
        # Slowloris: four connections sending a header a byte at a time. A new client is never left
        # hanging (503 at once while they hold every slot), and they are cut at the request deadline.
        # (the handlers of the closed idle connections may take a moment to give their slots back: a
        # slow client answered 503 at once is not holding a slot, so it is replaced until 4 are held)
        held = []
        for _ in range(40):
            s = socket.create_connection((host, port))
            s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
            s.settimeout(0.2)
            try:
                answered = s.recv(1)
            except TimeoutError:
                answered = b""
            if answered:
                s.close()
                time.sleep(0.1)
                continue
            held.append(s)
            if len(held) == 4:
                break
        assert len(held) == 4
        t0 = time.monotonic()
        assert _get(daemon.url + "/v2/health/ready") in (200, 503) and time.monotonic() - t0 < 2
        wait_for(lambda: _get(daemon.url + "/v2/health/ready") == 200, 10, "the slow clients to be cut")
        for s in held:
            s.close()
        # A JSON body over the JSON limit: 413 without reading it.
        body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2000],
                                       "data": [0.0] * 2000}]}).encode()  # fmt: skip
        req = urllib.request.Request(daemon.url + "/v2/models/cls/infer", data=body, method="POST")
        try:
            urllib.request.urlopen(req, timeout=5)
            raise AssertionError("an oversized JSON body was accepted")
        except urllib.error.HTTPError as e:
            assert e.code == 413 and "JSON body" in e.read().decode()
        assert infer_ok(daemon.url)  # binary bodies are not held to the JSON limit
        metrics = urllib.request.urlopen(daemon.url + "/metrics", timeout=5).read().decode()
        for reason in ("evicted_idle", "request_timeout", "too_large"):
            assert f'edgert_http_refused_total{{reason="{reason}"}}' in metrics, reason
    finally:
        for s in held:
            s.close()
        daemon.stop()
    # A flood: 100 clients at once against the default cap get answers, not connection resets.
    daemon = Daemon(state)
    try:
        with ThreadPoolExecutor(100) as pool:
            codes = list(pool.map(lambda _: _get(daemon.url + "/v2/health/ready", 10), range(100)))
        assert codes == [200] * 100, sorted(set(codes))
    finally:
        daemon.stop()


# --- 6. verdicts the fleet can trust ------------------------------------------------------------


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
        assert w.event("update-started") and not w.event("update-refused")
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


# --- 5. the fleet must not believe what it cannot check: slow and failing bundle stores ---------


class BundleStore:
    """A bundle server on loopback that misbehaves on purpose: ``flaky`` cuts the first response
    half way, ``stall`` sends a little and then nothing. Ranges are honoured (206)."""

    def __init__(self, data: bytes, mode: str) -> None:
        import http.server
        import threading

        self.data, self.mode, self.ranges, self.requests = data, mode, [], 0
        store = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                store.requests += 1
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                store.ranges.append(rng)
                body = store.data[start:]
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if store.mode == "flaky" and store.requests == 1:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # cut mid-transfer: a network blip
                    return
                if store.mode == "stall":
                    self.wfile.write(body[:1024])
                    self.wfile.flush()
                    time.sleep(60)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/bundle"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
    fleet = ["fleet", "--broker", broker.controller_url, "--username", "controller", "--password-file", str(cpw),
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
