"""Telemetry is never lost: a broker outage of 30+ s while records flow, with a kill -9 of the
daemon during the outage. After recovery every record produced arrives exactly once after
de-duplication by sequence number, in order."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.contracts.bundle import generate_keypair
from tests.broker import Broker
from tests.conftest import Daemon, edgert
from tests.fleet_models import make_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

OUTAGE_S = 32


def test_outage_and_kill9_lose_nothing(tmp_path: Path, keys: Path) -> None:
    broker = Broker(tmp_path / "broker", {"controller": "c", "dev9": "d"})
    generate_keypair(tmp_path / "fleet")
    state = tmp_path / "state"
    edgert("install", str(make_bundle(tmp_path / "b.edgepkg", keys / "signing.key", "1.0.0")), "--state-dir", str(state),
           "--trust", str(keys / "signing.pub"), check=True)  # fmt: skip
    (tmp_path / "pw").write_text("d")
    args = ("--broker", broker.url, "--device-id", "dev9", "--group", "g", "--fleet-key", str(tmp_path / "fleet/signing.pub"),
            "--broker-password-file", str(tmp_path / "pw"), "--telemetry-interval", "0.2")  # fmt: skip

    received: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_message(c: Any, u: Any, m: Any) -> None:
        with lock:
            received.append(json.loads(m.payload))

    # The receiver keeps a persistent session (and the broker persists it): nothing published
    # while it reconnects is lost on its side either.
    def receiver() -> Any:
        c = broker.client("controller", client_id="telemetry-receiver", clean=False)
        c.on_message = on_message
        c.subscribe("edgert/v1/devices/dev9/telemetry", 1)
        return c

    rx = receiver()
    daemon = Daemon(state, *args)
    try:
        time.sleep(3)  # records flow live
        broker.stop()
        outage_start = time.monotonic()
        time.sleep(OUTAGE_S / 2)
        daemon.proc.send_signal(signal.SIGKILL)  # kill -9 in the middle of the outage
        assert daemon.proc.wait(10) == -9
        daemon.log.close()
        daemon = Daemon(state, *args)  # restarted, still offline: keeps buffering
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - outage_start)))
        outage = time.monotonic() - outage_start
        buffered = json.loads(edgert("status", "--state-dir", str(state), "--json", check=True).stdout)["outbox"][
            "depth"
        ]
        broker.start()
        rx.loop_stop()
        rx = receiver()
        deadline = time.monotonic() + 60
        produced_at_drain = None
        while time.monotonic() < deadline:
            with sqlite3.connect(state / "outbox.db") as peek:  # WAL: a reader beside the daemon is fine
                produced_now = peek.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()[0]
            if (
                json.loads(edgert("status", "--state-dir", str(state), "--json", check=True).stdout)["outbox"]["depth"]
                == 0
            ):
                produced_at_drain = produced_now
                break
            time.sleep(0.5)
        assert produced_at_drain is not None, "the outbox never drained after the broker came back"
        assert daemon.stop() == 0  # stops production too; what it produced last is flushed or kept
        time.sleep(1.0)
    finally:
        if daemon.proc.poll() is None:
            daemon.stop()
    db = sqlite3.connect(state / "outbox.db")
    produced = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()[0]
    pending = [r[0] for r in db.execute("SELECT seq FROM records")]
    db.close()
    with lock:
        seqs = [r["seq"] for r in received if r["kind"] != "event"]
        events = {r["seq"] for r in received if r["kind"] == "event"}
    first_seen: list[int] = []
    for s in seqs:
        if s not in first_seen:
            first_seen.append(s)
    assert outage >= 30 and buffered > 50, (outage, buffered)
    # Everything produced before the drain was delivered: only what came after it may still wait.
    assert all(s > produced_at_drain for s in pending), (produced_at_drain, pending[:5])
    expected = set(range(1, produced + 1)) - set(pending) - events
    assert set(first_seen) == expected, f"missing {sorted(expected - set(first_seen))[:10]}"
    assert first_seen == sorted(first_seen)  # in order per device
    print(
        f"{produced} records, {buffered} buffered during a {outage:.0f} s outage, {len(seqs) - len(first_seen)} duplicates dropped"
    )
    rx.loop_stop()
    broker.stop()
