"""The sequence guard: the highest accepted desired-state seq per scope, persisted, so a replayed
or stale retained message stays refused across restarts.

It fails closed. The file is written twice (the guard and a backup copy); if the guard is found
corrupt, it is moved aside and rebuilt from the backup and from the seqs the agent recorded with
its update outcomes. If nothing trustworthy is left, the guard refuses every desired state issued
before the moment of the rebuild (seqs are the controller's clock in ms): the device keeps
serving what it runs until the controller signs a new desired state. It never accepts an older
desired state because its file was lost.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edge_runtime.contracts.durable import atomic_write, read_json_file
from edge_runtime.contracts.signed import ControlRefused

log = logging.getLogger(__name__)
FLOOR = "*floor*"  # a rebuilt guard's lower bound for every scope (not a scope: scopes never hold '*')


def _seqs(data: object) -> dict[str, int]:
    if not isinstance(data, dict) or not all(isinstance(k, str) and type(v) is int for k, v in data.items()):
        raise ValueError("expected an object of scope -> integer seq")
    return dict(data)


class SeqGuard:
    """Owns control-seq.json (and its backup). Never decides what a desired state means."""

    def __init__(self, path: Path, known: dict[str, int] | None = None) -> None:
        """``known``: seqs recorded elsewhere (update outcomes), used when the guard was lost."""
        self.path = path
        self.backup = path.with_name(path.name + ".bak")
        self.closed_floor = -1  # > -1 only when the guard was lost: nothing older is accepted
        self.write_errors = 0
        corrupt: list[bool] = []

        def lost() -> dict[str, int]:
            corrupt.append(True)
            return {}

        existed = path.exists()
        main = read_json_file(path, _seqs, lost, "rebuilt from its backup and the recorded outcomes")
        corrupt = corrupt if existed else []  # a missing file reads as the default too
        if corrupt or (not existed and self.backup.exists()):
            corrupt = [True]
            backup: dict[str, int] = read_json_file(self.backup, _seqs, lambda: {}, "not used")
            merged = dict(backup)
            for scope, seq in (known or {}).items():
                merged[scope] = max(seq, merged.get(scope, -1))
            if not merged:
                merged[FLOOR] = self.closed_floor = int(time.time() * 1000)
                log.error(
                    "the sequence guard was lost with nothing to rebuild it from: refusing every desired "
                    "state issued before %d (now) until the controller signs a new one",
                    self.closed_floor,
                )
            main = merged
        self.seen: dict[str, int] = main
        self.closed_floor = self.seen.get(FLOOR, -1)
        self.rebuilt = bool(corrupt)
        if self.rebuilt:
            self._persist()  # the rebuilt guard (with its floor) survives a restart before any accept

    def last(self, scope: str) -> int:
        return self.seen.get(scope, self.closed_floor)

    def check(self, scope: str, seq: int) -> None:
        last = self.last(scope)
        if seq <= last:
            raise ControlRefused("replayed", f"seq {seq} for {scope} is not newer than {last}")

    def accept(self, scope: str, seq: int) -> None:
        self.seen[scope] = seq
        self._persist()

    def scopes(self) -> dict[str, int]:
        """The accepted seq per scope (what the device reports)."""
        return {k: v for k, v in self.seen.items() if k != FLOOR}

    def _persist(self) -> None:
        data = json.dumps(self.seen).encode()
        try:
            atomic_write(self.path, data)
            atomic_write(self.backup, data)
        except OSError as e:  # disk full, read-only: the guard holds in memory; counted and reported
            self.write_errors += 1
            log.error("cannot persist the sequence guard (%s): kept in memory only", e)
