"""Store-and-forward telemetry: a SQLite outbox that outlives broker outages, kill -9 and
power loss.

Every record is committed (WAL, synchronous=FULL: fsync at commit) before anyone may send it,
carries a per-device sequence number that never repeats (receivers drop duplicates with it),
and is deleted only after the broker acknowledged it. The outbox is bounded; when full, the
oldest records go and the number dropped is kept (and reported), never silent.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.contracts.durable import report_corrupt

log = logging.getLogger(__name__)


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
        self.max_bytes, self.max_records = max_bytes, max_records
        self._lock = threading.Lock()
        self.degraded = ""  # why the outbox is not on disk (read-only or broken state dir), if so
        try:
            self._db = self._open(self.path)
        except sqlite3.DatabaseError as e:  # a corrupt file (not a database, malformed): aside, fresh
            aside = report_corrupt(self.path, f"{type(e).__name__}: {e}", "a new, empty outbox was created")
            if aside is None:  # not moved (inspecting, or a read-only disk): leave every file as it is
                self._db = self._in_memory(f"{self.path} is corrupt: {e}")
            else:
                for suffix in ("-wal", "-shm"):  # they belong to the corrupt file, now aside
                    src = Path(str(self.path) + suffix)
                    if src.exists():
                        src.replace(Path(str(aside) + suffix))
                try:
                    self._db = self._open(self.path)
                except (sqlite3.Error, OSError) as e2:
                    self._db = self._in_memory(f"cannot create {self.path}: {e2}")
        except OSError as e:
            self._db = self._in_memory(f"cannot create {self.path}: {e}")
        # Running totals: checking the bound must not scan the table on every record (it would
        # slow down exactly during long outages, when the table is largest).
        count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records").fetchone()
        self._count, self._size = int(count), int(size)
        self.wake = threading.Event()  # set on every put, so a sender can sleep until there is work
        self.write_errors = 0

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            Outbox._schema(db)
            row = db.execute("PRAGMA quick_check").fetchone()
            if row is None or row[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {row[0] if row else 'no answer'}")
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _schema(db: sqlite3.Connection) -> None:
        db.execute(
            "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " kind TEXT NOT NULL, created REAL NOT NULL, payload BLOB NOT NULL)"
        )
        db.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")

    def _in_memory(self, reason: str) -> sqlite3.Connection:
        """Degraded: telemetry is kept in memory (lost on restart) rather than refusing to start."""
        log.error("outbox degraded to memory: %s", reason)
        self.degraded = reason
        db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        self._schema(db)
        return db

    def put(self, kind: str, data: dict[str, Any]) -> int:
        """Commit one record. On a full disk the oldest tenth is dropped (counted) and the record
        tried once more; if the disk is still full the record is refused (``OSError``)."""
        payload = json.dumps(data, separators=(",", ":")).encode()
        try:
            return self._put(kind, payload)
        except sqlite3.OperationalError as e:
            if "full" not in str(e) and "I/O" not in str(e):
                raise
            self.write_errors += 1
            log.error("outbox write failed (%s): dropping the oldest records to make room", e)
            self.drop_oldest(max(1, self._count // 10))
            try:
                return self._put(kind, payload)
            except sqlite3.OperationalError as e2:
                self.write_errors += 1
                raise OSError(f"outbox cannot store a record: {e2}") from e2

    def _put(self, kind: str, payload: bytes) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT INTO records (kind, created, payload) VALUES (?, ?, ?)", (kind, time.time(), payload)
                )
                count, size = self._enforce_bounds(self._count + 1, self._size + len(payload))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                    self._db.execute("ROLLBACK")
                raise
            self._count, self._size = count, size
        self.wake.set()
        return int(cur.lastrowid or 0)

    def drop_oldest(self, n: int) -> int:
        """Drop the ``n`` oldest records (counted as dropped): what goes when space runs out."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT seq, LENGTH(payload) FROM records ORDER BY seq LIMIT ?", (n,)
                ).fetchall()
                if not rows:
                    return 0
                self._db.execute("DELETE FROM records WHERE seq <= ?", (rows[-1][0],))
                self._count_dropped(len(rows))
            except sqlite3.Error as e:
                log.error("cannot drop records either (%s)", e)
                return 0
            self._count -= len(rows)
            self._size -= sum(int(r[1]) for r in rows)
        return len(rows)

    def _count_dropped(self, dropped: int) -> None:
        self._db.execute(
            "INSERT INTO counters (name, value) VALUES ('dropped', ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (dropped,),
        )

    def _enforce_bounds(self, count: int, size: int) -> tuple[int, int]:
        dropped = 0
        while count > 1 and (count > self.max_records or size > self.max_bytes):
            seq, n = self._db.execute("SELECT seq, LENGTH(payload) FROM records ORDER BY seq LIMIT 1").fetchone()
            self._db.execute("DELETE FROM records WHERE seq = ?", (seq,))
            count, size, dropped = count - 1, size - n, dropped + 1
        if dropped:
            self._count_dropped(dropped)
        return count, size

    def peek(self, limit: int = 100, after: int = 0) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, kind, created, payload FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
            ).fetchall()
        return [Record(int(s), str(k), float(c), bytes(p)) for s, k, c, p in rows]

    def ack(self, up_to: int) -> None:
        """Delete every record with seq <= up_to (the broker acknowledged them, in order)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                gone, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM records WHERE seq <= ?", (up_to,)
                ).fetchone()
                self._db.execute("DELETE FROM records WHERE seq <= ?", (up_to,))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                    self._db.execute("ROLLBACK")
                raise
            self._count, self._size = self._count - int(gone), self._size - int(size)

    def stats(self) -> dict[str, int]:
        with self._lock:
            count, size = self._count, self._size
            row = self._db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        disk = sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())
        return {"depth": int(count), "bytes": int(size), "disk_bytes": disk, "dropped": int(row[0]) if row else 0}

    def close(self) -> None:
        with self._lock:
            self._db.close()
