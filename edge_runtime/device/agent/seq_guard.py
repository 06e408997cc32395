"""The sequence guard: the highest accepted desired-state seq per scope, persisted, so a replayed
or stale retained message stays refused across restarts."""

from __future__ import annotations

import json
from pathlib import Path

from edge_runtime.contracts.durable import atomic_write
from edge_runtime.contracts.signed import ControlRefused


class SeqGuard:
    """The highest accepted sequence per scope, persisted: replays stay refused across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[str, int] = json.loads(path.read_text()) if path.exists() else {}

    def check(self, scope: str, seq: int) -> None:
        last = self.seen.get(scope, -1)
        if seq <= last:
            raise ControlRefused("replayed", f"seq {seq} for {scope} is not newer than {last}")

    def accept(self, scope: str, seq: int) -> None:
        self.seen[scope] = seq
        atomic_write(self.path, json.dumps(self.seen).encode())
