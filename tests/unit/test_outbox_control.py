"""Outbox ordering, bounds and durability; control envelopes and the sequence guard."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from edge_runtime.contracts.bundle import generate_keypair, load_private_key, load_public_keys
from edge_runtime.contracts.signed import ControlRefused, desired_payload, open_envelope, sign
from edge_runtime.device.agent.outbox import Outbox
from edge_runtime.device.agent.seq_guard import SeqGuard

pytestmark = pytest.mark.unit


def test_outbox_order_ack_and_reopen(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    seqs = [ob.put("metrics", {"i": i}) for i in range(10)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 10
    assert [r.seq for r in ob.peek(4)] == seqs[:4]
    ob.ack(seqs[3])
    ob.close()
    again = Outbox(tmp_path / "o.db")  # as after a restart: nothing acked is lost, nothing acked returns
    assert [r.seq for r in again.peek(100)] == seqs[4:]
    assert again.put("metrics", {}) > seqs[-1]  # sequence numbers never repeat, even after deletes
    again.close()


def test_outbox_bound_drops_oldest_and_counts(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db", max_bytes=2000)
    for i in range(100):
        ob.put("metrics", {"pad": "x" * 80, "i": i})
    st = ob.stats()
    assert st["bytes"] <= 2000 and st["dropped"] == 100 - st["depth"] and st["dropped"] > 0
    left = ob.peek(1000)
    assert [r.seq for r in left] == list(range(100 - st["depth"] + 1, 101))  # the newest survive, in order
    ob.close()


def test_outbox_is_wal_and_full_sync(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.db")
    # synchronous is a property of the connection, not the file: ask the outbox's own one
    assert ob._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: fsync at every commit
    ob.close()
    db = sqlite3.connect(tmp_path / "o.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent: stored in the file
    db.close()


def test_control_envelope(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a")
    generate_keypair(tmp_path / "b")
    key = load_private_key(tmp_path / "a" / "signing.key")
    pubs = load_public_keys([tmp_path / "a" / "signing.pub"])
    msg = sign(desired_payload("dev1", 5, {"m": {}}), key)
    assert open_envelope(msg, pubs, "dev1", "desired")["seq"] == 5
    with pytest.raises(ControlRefused) as e:
        open_envelope(msg, pubs, "dev2", "desired")
    assert e.value.reason == "wrong-scope"
    with pytest.raises(ControlRefused) as e:
        open_envelope(msg, load_public_keys([tmp_path / "b" / "signing.pub"]), "dev1", "desired")
    assert e.value.reason == "forged"
    tampered = msg.replace(b'"seq": 5', b'"seq": 6')
    with pytest.raises(ControlRefused) as e:
        open_envelope(tampered, pubs, "dev1", "desired")
    assert e.value.reason == "forged"


def test_seq_guard_persists(tmp_path: Path) -> None:
    g = SeqGuard(tmp_path / "seq.json")
    g.check("dev1", 3)
    g.accept("dev1", 3)
    g2 = SeqGuard(tmp_path / "seq.json")
    with pytest.raises(ControlRefused) as e:
        g2.check("dev1", 3)
    assert e.value.reason == "replayed"
    g2.check("dev1", 4)
    g2.check("group:g", 0)
