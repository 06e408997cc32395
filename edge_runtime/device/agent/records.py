"""The agent's small persistent records: refusal counters, failure counters and each model's last
update outcome.

Both are JSON files in STATE/agent/, written atomically, read back at start so that the controller
keeps seeing them after a restart. A corrupt file is moved aside and the record starts empty (the
event is reported); a write that fails (disk full, read-only) keeps the record in memory, counted.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from edge_runtime.contracts.durable import atomic_write, read_json_file
from edge_runtime.contracts.fleet import OutcomeRecord, UpdateOutcome, VerdictKind, WindowFigures

log = logging.getLogger(__name__)


def _counts(data: Any) -> dict[str, int]:
    if not isinstance(data, dict) or not all(isinstance(k, str) and type(v) is int for k, v in data.items()):
        raise ValueError("expected an object of reason -> integer count")
    return dict(data)


def _outcomes(data: Any) -> dict[str, OutcomeRecord]:
    if not isinstance(data, dict):
        raise ValueError("expected an object of model -> outcome")
    return {str(k): OutcomeRecord.model_validate(v) for k, v in data.items()}


class AgentRecords:
    """Owns counters.json (refusals by reason), errors (what failed inside the agent, by where) and
    outcomes.json (last outcome per model). Never decides anything: the session and the converger
    tell it what happened."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("cannot create %s (%s): agent records are kept in memory only", folder, e)
        self._lock = threading.Lock()
        self.refused: Counter[str] = Counter(
            read_json_file(self.dir / "counters.json", _counts, lambda: {}, "refusal counts start from zero")
        )
        self.outcomes: dict[str, OutcomeRecord] = read_json_file(
            self.dir / "outcomes.json", _outcomes, lambda: {}, "update outcomes start empty"
        )
        self.errors: Counter[str] = Counter()  # not persisted: a restart is itself the remedy

    def _write(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self.dir / name, data)
        except OSError as e:
            self.count_error("disk")
            log.error("cannot write %s (%s): kept in memory", self.dir / name, e)

    def count_refusal(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] += 1
            data = json.dumps(self.refused).encode()
        self._write("counters.json", data)

    def count_error(self, where: str) -> None:
        with self._lock:
            self.errors[where] += 1

    def refusals(self) -> dict[str, int]:
        with self._lock:
            return dict(self.refused)

    def error_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.errors)

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
        self._write("outcomes.json", data)
        return entry

    def outcome_of(self) -> dict[str, OutcomeRecord]:
        with self._lock:
            return dict(self.outcomes)

    def known_seqs(self) -> dict[str, int]:
        """The highest desired-state seq per scope any recorded outcome answered."""
        known: dict[str, int] = {}
        for o in self.outcome_of().values():
            for scope, seq in o.seqs.items():
                known[scope] = max(seq, known.get(scope, -1))
        return known
