"""The controller's own state and parameters, without a broker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edge_runtime.fleet.controller import FleetError, RolloutParams
from edge_runtime.fleet.db import ControllerDB

pytestmark = pytest.mark.unit


def test_seq_grows_per_scope_from_the_clock_and_survives_reopening(tmp_path: Path) -> None:
    db = ControllerDB(tmp_path / "fleet.db")
    now_ms = int(time.time() * 1000)
    a1, a2, b1 = db.next_seq("group:a"), db.next_seq("group:a"), db.next_seq("dev1")
    assert now_ms <= a1 < a2 and b1 >= now_ms
    db.record_message("group:a", a2, b"signed")
    db.close()
    db = ControllerDB(tmp_path / "fleet.db")  # a restarted controller never reuses a seq
    assert db.next_seq("group:a") > a2
    assert db.messages(["group:a", "dev1"]) == [("group:a", a2, b"signed")]  # dev1's message was never recorded
    db.close()


def test_one_active_rollout_per_group_and_model(tmp_path: Path) -> None:
    db = ControllerDB(tmp_path / "fleet.db")
    rid = db.create_rollout("cls", "2.0.0", "1.0.0", "g", "staged", {})
    with pytest.raises(RuntimeError, match=f"rollout {rid} of cls to group g is still active"):
        db.create_rollout("cls", "3.0.0", "1.0.0", "g", "canary", {})
    db.create_rollout("other", "2.0.0", None, "g", "canary", {})  # another model is independent
    db.set_rollout(rid, status="aborted", reason="test")
    assert db.rollout(rid).finished is not None  # type: ignore[union-attr]
    db.create_rollout("cls", "3.0.0", "1.0.0", "g", "canary", {})
    db.close()


@pytest.mark.parametrize(
    "strategy,kw,message",
    [
        ("rolling", {}, "--strategy must be one of"),
        ("staged", {"steps": [50.0, 10.0]}, "increasing percentages"),
        ("staged", {"steps": [0.0, 100.0]}, "increasing percentages"),
        ("ab", {"split": 100.0}, "--split is a percentage"),
        ("canary", {"max_failure_rate": 1.5}, "--max-failure-rate"),
        ("canary", {"min_devices": 0}, "--min-devices"),
    ],
)
def test_rollout_parameters_are_validated(strategy: str, kw: dict[str, object], message: str) -> None:
    with pytest.raises(FleetError, match=message):
        RolloutParams(**kw).validate(strategy)  # type: ignore[arg-type]


def test_defaults_per_strategy() -> None:
    p = RolloutParams()
    p.validate("staged")
    assert p.steps == [1.0, 10.0, 50.0, 100.0] and p.stage_timeout == 3 * 30 + 60
    p = RolloutParams(steps=[5.0])
    p.validate("canary")
    assert p.steps == [5.0, 100.0]  # the rest follows the canary


def test_rollouts_filters_active_recently_finished_and_newest(tmp_path: Path) -> None:
    db = ControllerDB(tmp_path / "fleet.db")
    ids = [db.create_rollout("m", f"1.0.{i}", None, f"g{i}", "canary", {}, 1) for i in range(5)]
    db.set_rollout(ids[0], status="aborted")  # finished now
    db.set_rollout(ids[1], status="completed", finished=time.time() - 1000)  # long ago
    assert [r.id for r in db.rollouts()] == ids
    assert [r.id for r in db.rollouts(active_only=True)] == ids[2:]
    assert [r.id for r in db.rollouts(active_only=True, finished_since=time.time() - 60)] == [ids[0], *ids[2:]]
    assert [r.id for r in db.rollouts(last=2)] == ids[3:]
    db.close()
