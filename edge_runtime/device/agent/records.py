"""The agent's small persistent records: refusal counters and each model's last update outcome.

Both are JSON files in STATE/agent/, written atomically, read back at start so that the
controller keeps seeing them after a restart.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

from edge_runtime.contracts.durable import atomic_write
from edge_runtime.contracts.fleet import OutcomeRecord, UpdateOutcome, VerdictKind, WindowFigures


class AgentRecords:
    """Owns counters.json (refusals by reason) and outcomes.json (last outcome per model). Never
    decides anything: the session and the converger tell it what happened."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        counters = self.dir / "counters.json"
        self.refused: Counter[str] = Counter(json.loads(counters.read_text()) if counters.exists() else {})
        path = self.dir / "outcomes.json"
        raw = json.loads(path.read_text()) if path.exists() else {}
        self.outcomes: dict[str, OutcomeRecord] = {k: OutcomeRecord.model_validate(v) for k, v in raw.items()}

    def count_refusal(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1
            data = json.dumps(self.refused).encode()
        atomic_write(self.dir / "counters.json", data)

    def refusals(self) -> dict[str, int]:
        with self._lock:
            return dict(self.refused)

    def record_outcome(
        self,
        model: str,
        version: str,
        outcome: UpdateOutcome,
        reason: str,
        seqs: dict[str, int],
        figures: WindowFigures | None = None,
        verdict: VerdictKind | None = None,
    ) -> OutcomeRecord:
        entry = OutcomeRecord(
            version=version, outcome=outcome, reason=reason[:300], ts=time.time(), seqs=dict(seqs),
            figures=figures or WindowFigures(), verdict=verdict,
        )  # fmt: skip
        with self._lock:
            self.outcomes[model] = entry
            data = json.dumps({k: v.model_dump(mode="json") for k, v in self.outcomes.items()}).encode()
        atomic_write(self.dir / "outcomes.json", data)
        return entry

    def outcome_of(self) -> dict[str, OutcomeRecord]:
        with self._lock:
            return dict(self.outcomes)
