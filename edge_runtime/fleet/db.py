"""The controller's own state, in SQLite (WAL, synchronous=FULL): published bundles, the last
signed desired message per scope, rollouts, each device's part in them, and every decision.

The broker's retained desired state stays the source of truth for devices; this file is what
lets a controller killed mid-rollout pick up where it was (``edgert fleet resume``), and lets
``abort``/``rollback`` run from another process while a rollout is being driven.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.contracts.fleet import BundleRef

SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (
    name TEXT NOT NULL, version TEXT NOT NULL, target TEXT NOT NULL, sha256 TEXT NOT NULL,
    ref TEXT NOT NULL, published REAL NOT NULL, PRIMARY KEY (name, version, target));
CREATE TABLE IF NOT EXISTS seqs (scope TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS published (
    scope TEXT PRIMARY KEY, seq INTEGER NOT NULL, message BLOB NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version TEXT NOT NULL,
    from_version TEXT, grp TEXT NOT NULL, strategy TEXT NOT NULL, params TEXT NOT NULL,
    status TEXT NOT NULL, phase INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL, finished REAL,
    population INTEGER NOT NULL DEFAULT 0, driven INTEGER NOT NULL DEFAULT 0,
    group_published INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout INTEGER NOT NULL, device TEXT NOT NULL, stage INTEGER NOT NULL, status TEXT NOT NULL,
    scope TEXT NOT NULL, seq INTEGER NOT NULL, from_version TEXT, moved REAL NOT NULL,
    judged REAL, reason TEXT NOT NULL DEFAULT '', PRIMARY KEY (rollout, device));
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY, grp TEXT NOT NULL, enrolled REAL NOT NULL);
CREATE TABLE IF NOT EXISTS decisions (
    rollout INTEGER NOT NULL, ts REAL NOT NULL, message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    rollout INTEGER NOT NULL, ts REAL NOT NULL, version TEXT NOT NULL, devices INTEGER NOT NULL,
    rows INTEGER NOT NULL DEFAULT 0, error_rate REAL, p95_ms REAL);
CREATE INDEX IF NOT EXISTS samples_by_rollout ON samples (rollout, ts);
"""

ACTIVE = ("running", "observing", "aborting")
# Bookkeeping columns added after the first schema (older state files gain them on open).
MIGRATIONS = {
    "population": "ALTER TABLE rollouts ADD COLUMN population INTEGER NOT NULL DEFAULT 0",
    "driven": "ALTER TABLE rollouts ADD COLUMN driven INTEGER NOT NULL DEFAULT 0",
    "group_published": "ALTER TABLE rollouts ADD COLUMN group_published INTEGER NOT NULL DEFAULT 0",
}
ROLLOUT_COLUMNS = (
    "id, name, version, from_version, grp, strategy, params, status, phase, reason, created, updated, finished,"
    " population, driven, group_published"
)


@dataclass
class Rollout:
    id: int
    name: str
    version: str
    from_version: str | None
    group: str
    strategy: str
    params: dict[str, Any]
    status: str
    phase: int
    reason: str
    created: float
    updated: float
    finished: float | None
    population: int = 0  # devices in the group when the rollout was created
    driven: bool = False  # a controller has driven it (a restart republishes its messages)
    group_published: bool = False  # the current phase's group desired state is out
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


class ControllerDB:
    """The controller's state file (SQLite, WAL, BEGIN IMMEDIATE writes).

    Owns published bundles, seqs and the last signed message per scope, rollouts with their
    bookkeeping columns, each device's part and every decision. Never talks to the broker."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(rollouts)")}
        for column, statement in MIGRATIONS.items():
            if column not in have:
                self._db.execute(statement)
        self._lock = threading.RLock()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE): two controller processes on the
        same file (a driver and an ``abort``) never interleave their writes."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- sequence numbers and published messages ---------------------------------------

    def next_seq(self, scope: str) -> int:
        """Grows per scope, and starts from the clock (ms): a new state file still beats what
        devices accepted from an older controller."""
        with self.tx() as db:
            row = db.execute("SELECT seq FROM seqs WHERE scope=?", (scope,)).fetchone()
            seq = max((row[0] + 1) if row else 0, int(time.time() * 1000))
            db.execute("INSERT OR REPLACE INTO seqs (scope, seq) VALUES (?, ?)", (scope, seq))
        return seq

    def record_message(self, scope: str, seq: int, message: bytes) -> None:
        """The last signed message of a scope (kept only if no newer one was recorded meanwhile)."""
        with self.tx() as db:
            db.execute(
                "INSERT INTO published (scope, seq, message, ts) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(scope) DO UPDATE SET seq=excluded.seq, message=excluded.message, ts=excluded.ts "
                "WHERE excluded.seq > published.seq",
                (scope, seq, message, time.time()),
            )

    def messages(self, scopes: list[str]) -> list[tuple[str, int, bytes]]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT scope, seq, message FROM published WHERE scope IN ({','.join('?' * len(scopes))})",
                scopes,
            ).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    # --- bundles ---------------------------------------------------------------------

    def add_bundle(self, name: str, version: str, target: str, ref: BundleRef) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO bundles VALUES (?, ?, ?, ?, ?, ?)",
                (name, version, target, ref.sha256, ref.model_dump_json(exclude_none=True), time.time()),
            )

    def bundle(self, name: str, version: str, target: str | None = None) -> BundleRef | None:
        q = "SELECT ref FROM bundles WHERE name=? AND version=?" + (" AND target=?" if target else "")
        args = (name, version, target) if target else (name, version)
        with self._lock:
            row = self._db.execute(q + " ORDER BY published DESC", args).fetchone()
        return BundleRef.model_validate_json(row[0]) if row else None

    def bundles(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, version, target, sha256, published FROM bundles ORDER BY published"
            ).fetchall()
        return [dict(zip(("name", "version", "target", "sha256", "published"), r, strict=True)) for r in rows]

    # --- device registry: the fleet's own record of which group a device is in -----------

    def device_groups(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT id, grp FROM devices").fetchall())

    def enroll(self, device: str, group: str, replace: bool = False) -> str:
        """Record a device's group the first time it is seen (or, with ``replace``, as the operator
        says); returns the group on record."""
        with self.tx() as db:
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            db.execute(f"{verb} INTO devices (id, grp, enrolled) VALUES (?, ?, ?)", (device, group, time.time()))
            row = db.execute("SELECT grp FROM devices WHERE id=?", (device,)).fetchone()
        return str(row[0])

    # --- rollouts --------------------------------------------------------------------

    def create_rollout(
        self,
        name: str,
        version: str,
        from_version: str | None,
        group: str,
        strategy: str,
        params: dict[str, Any],
        population: int = 0,
    ) -> int:
        now = time.time()
        with self.tx() as db:
            busy = db.execute(
                f"SELECT id FROM rollouts WHERE grp=? AND name=? AND status IN ({','.join('?' * len(ACTIVE))})",
                (group, name, *ACTIVE),
            ).fetchone()
            if busy:
                raise RuntimeError(f"rollout {busy[0]} of {name} to group {group} is still active; abort it first")
            cur = db.execute(
                "INSERT INTO rollouts (name, version, from_version, grp, strategy, params, status, created, updated,"
                " population) VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
                (name, version, from_version, group, strategy, json.dumps(params), now, now, population),
            )
            rid = int(cur.lastrowid or 0)
        return rid

    def rollout(self, rid: int) -> Rollout | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id=?",
                (rid,),
            ).fetchone()
            if row is None:
                return None
            devs = self._db.execute(
                "SELECT device, stage, status, scope, seq, from_version, moved, judged, reason FROM rollout_devices"
                " WHERE rollout=?",
                (rid,),
            ).fetchall()
        r = Rollout(
            id=row[0], name=row[1], version=row[2], from_version=row[3], group=row[4], strategy=row[5],
            params=json.loads(row[6]), status=row[7], phase=row[8], reason=row[9], created=row[10],
            updated=row[11], finished=row[12], population=row[13], driven=bool(row[14]),
            group_published=bool(row[15]),
        )  # fmt: skip
        keys = ("stage", "status", "scope", "seq", "from_version", "moved", "judged", "reason")
        r.devices = {d[0]: dict(zip(keys, d[1:], strict=True)) for d in devs}
        return r

    def rollouts(
        self, active_only: bool = False, finished_since: float | None = None, last: int | None = None
    ) -> list[Rollout]:
        """Rollouts by id; ``active_only`` (or, with ``finished_since``, also those ended since then);
        ``last``: only the newest N."""
        q, args = "SELECT id FROM rollouts", list[object]()
        if active_only:
            q += f" WHERE (status IN ({','.join('?' * len(ACTIVE))})"
            args += list(ACTIVE)
            if finished_since is not None:
                q += " OR finished > ?"
                args.append(finished_since)
            q += ")"
        q += " ORDER BY id DESC" + (f" LIMIT {int(last)}" if last else "")
        with self._lock:
            ids = [r[0] for r in self._db.execute(q, args).fetchall()]
        return [r for i in reversed(ids) if (r := self.rollout(i)) is not None]

    def set_rollout(self, rid: int, **fields: Any) -> None:
        fields["updated"] = time.time()
        if fields.get("status") in ("completed", "aborted", "rolled-back", "dropped"):
            fields.setdefault("finished", time.time())
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE rollouts SET {cols} WHERE id=?", (*fields.values(), rid))

    def move_device(self, rid: int, device: str, stage: int, scope: str, seq: int, from_version: str | None) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO rollout_devices (rollout, device, stage, status, scope, seq, from_version,"
                " moved) VALUES (?, ?, ?, 'moved', ?, ?, ?, ?)",
                (rid, device, stage, scope, seq, from_version, time.time()),
            )

    def judge_device(self, rid: int, device: str, status: str, reason: str = "") -> None:
        with self.tx() as db:
            db.execute(
                "UPDATE rollout_devices SET status=?, judged=?, reason=? WHERE rollout=? AND device=?",
                (status, time.time(), reason[:300], rid, device),
            )

    def decide(self, rid: int, message: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO decisions VALUES (?, ?, ?)", (rid, time.time(), message))

    # --- samples: what the console saw over a rollout, per version (its plots) -------------

    def add_samples(self, rid: int, ts: float, rows: list[tuple[str, int, int, float | None, float | None]]) -> None:
        """(version, devices serving it, rows in the interval, error rate, p95 ms) at time ts."""
        with self.tx() as db:
            db.executemany(
                "INSERT INTO samples (rollout, ts, version, devices, rows, error_rate, p95_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(rid, ts, *row) for row in rows],
            )

    def samples(self, rid: int, limit: int = 2000) -> list[dict[str, Any]]:
        """The latest ``limit`` samples of a rollout, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ts, version, devices, rows, error_rate, p95_ms FROM samples WHERE rollout=?"
                " ORDER BY ts DESC LIMIT ?",
                (rid, limit),
            ).fetchall()
        keys = ("ts", "version", "devices", "rows", "error_rate", "p95_ms")
        return [dict(zip(keys, r, strict=True)) for r in reversed(rows)]

    def device_parts(self, device: str) -> list[dict[str, Any]]:
        """A device's part in every rollout that moved it, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT rollout, stage, status, from_version, moved, judged, reason FROM rollout_devices"
                " WHERE device=? ORDER BY moved DESC LIMIT 50",
                (device,),
            ).fetchall()
        keys = ("rollout", "stage", "status", "from_version", "moved", "judged", "reason")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def decisions(self, rid: int) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT ts, message FROM decisions WHERE rollout=? ORDER BY ts", (rid,)).fetchall()
        return [{"ts": r[0], "message": r[1]} for r in rows]
