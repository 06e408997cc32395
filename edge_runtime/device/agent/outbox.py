"""Store-and-forward telemetry: a SQLite outbox that outlives broker outages, kill -9 and
power loss.

Every record is committed (WAL, synchronous=FULL: fsync at commit) before anyone may send it,
carries a per-device sequence number that never repeats (receivers drop duplicates with it),
and is deleted only after the broker acknowledged it. The outbox is bounded; when full, the
oldest records go and the number dropped is kept (and reported), never silent.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Record:
    seq: int
    kind: str
    created: float
    payload: bytes

    def message(self, device: str) -> bytes:
        body = json.loads(self.payload)
        return json.dumps(
            {"device": device, "seq": self.seq, "kind": self.kind, "ts": self.created, "data": body},
            separators=(",", ":"),
        ).encode()


class Outbox:
    """The durable telemetry queue (SQLite, WAL, fsync per commit), bounded by a byte budget.

    Owns the records until the broker acknowledged them; drops the oldest when over budget and
    counts every drop. Never sends anything itself (telemetry.py does)."""

    def __init__(self, path: Path, max_bytes: int = 64 << 20, max_records: int = 1_000_000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_records = max_bytes, max_records
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " kind TEXT NOT NULL, created REAL NOT NULL, payload BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        self.wake = threading.Event()  # set on every put, so a sender can sleep until there is work

    def put(self, kind: str, data: dict[str, Any]) -> int:
        payload = json.dumps(data, separators=(",", ":")).encode()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO records (kind, created, payload) VALUES (?, ?, ?)", (kind, time.time(), payload)
                )
                self._enforce_bounds()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        self.wake.set()
        return int(cur.lastrowid or 0)

    def _enforce_bounds(self) -> None:
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records").fetchone()
        dropped = 0
        while count > 1 and (count > self.max_records or size > self.max_bytes):
            seq, n = self._db.execute("SELECT seq, LENGTH(payload) FROM records ORDER BY seq LIMIT 1").fetchone()
            self._db.execute("DELETE FROM records WHERE seq = ?", (seq,))
            count, size, dropped = count - 1, size - n, dropped + 1
        if dropped:
            self._db.execute(
                "INSERT INTO counters (name, value) VALUES ('dropped', ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (dropped,),
            )

    def peek(self, limit: int = 100, after: int = 0) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, created, payload FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [Record(int(s), str(k), float(c), bytes(p)) for s, k, c, p in rows]

    def ack(self, up_to: int) -> None:
        """Delete every record with seq <= up_to (the broker acknowledged them, in order)."""
        with self._lock:
            self._db.execute("DELETE FROM records WHERE seq <= ?", (up_to,))

    def stats(self) -> dict[str, int]:
        with self._lock:
            count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records").fetchone()
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        disk = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return {"depth": int(count), "bytes": int(size), "disk_bytes": disk, "dropped": int(row[0]) if row else 0}

    def close(self) -> None:
        with self._lock:
            self._db.close()
