"""Shared parts of the survival tests: the device under test, a watcher on the controller's
account, small file-system and HTTP helpers, a misbehaving bundle store."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.contracts.client import Client
from tests.broker import Broker
from tests.conftest import edgert
from tests.fleet_models import inputs, make_bundle

ACCOUNTS = {"controller": "ctl-secret", "sv1": "sv1-secret", "sv2": "sv2-secret", "sv3": "sv3-secret"}
HEALTH = {"window_s": 1, "min_inferences": 0, "min_baseline": 1000}
NESTED = b"[" * 1500 + b"]" * 1500  # 3 kB; json.loads alone raises RecursionError on it


def serve_args(broker: Broker, device: str, fleet_key: Path, pw: Path) -> list[str]:
    return ["--broker", broker.url, "--device-id", device, "--group", f"grp-{device}",
            "--fleet-key", str(fleet_key / "signing.pub"), "--broker-password-file", str(pw),
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


def get_status(url: str, timeout: float = 5) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


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
