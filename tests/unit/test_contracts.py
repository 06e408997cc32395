"""The typed device <-> fleet contract: what it accepts, what it refuses (by name), and bounded
JSON parsing that never raises RecursionError."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edge_runtime.contracts.fleet import (
    BundleRef,
    DesiredState,
    DeviceState,
    HealthPolicy,
    ModelSpec,
    OutcomeRecord,
    UpdateOutcome,
    dump,
    wire,
)
from edge_runtime.contracts.wire import WireError, nesting_depth, parse_json

pytestmark = pytest.mark.unit

SHA = "a" * 64
REF = {"sha256": SHA, "size": 1000, "chunk_size": 400, "chunks": [SHA, SHA, SHA]}


def _desired(models: object) -> dict[str, object]:
    return {"type": "desired", "scope": "group:g", "seq": 5, "issued": 1.0, "models": models}


def test_desired_state_round_trip() -> None:
    state = DesiredState.model_validate(
        _desired({"cls": {"version": "1.2.0", "bundle": REF, "health": {"window_s": 10, "min_inferences": 5},
                          "experiment": {"kind": "ab", "version": "1.3.0", "split": 0.3}}})
    )  # fmt: skip
    spec = state.models["cls"]
    assert spec.bundle is not None and spec.bundle.size == 1000 and spec.health is not None
    assert spec.health.window_s == 10 and spec.experiment is not None and spec.experiment.split == 0.3
    assert DesiredState.model_validate_json(state.model_dump_json()) == state


@pytest.mark.parametrize(
    ("models", "where"),
    [
        ({"cls": "1.0.0"}, "models.cls"),  # a model entry that is a string
        ({"cls": {"version": "1.0.0", "health": {"window_s": "long"}}}, "window_s"),
        ({"cls": {"version": "1.0.0", "health": {"window_s": 1e9}}}, "window_s"),
        ({"cls": {"version": "1.0.0", "health": {"window": 30}}}, "health.window"),  # unknown key
        ({"cls": {"version": "1.0.0", "bogus": 1}}, "bogus"),
        ({"cls": {"version": "1.0.0", "experiment": {"kind": "bogus", "version": "2.0.0"}}}, "experiment.kind"),
        ({"cls": {"version": "1.0.0", "experiment": {"kind": "ab", "version": "2.0.0", "split": 7}}}, "split"),
        ({"cls": {"version": "1.0.0\n"}}, "version"),
        ({"cls": {"version": "1.0.0", "bundle": {**REF, "size": 10}}}, "chunk list"),
        ({"cls": {"version": "1.0.0", "bundle": {"sha256": SHA, "size": 5}}}, "neither a URL"),
        ({"cls": {"version": "1.0.0", "bundle": {"sha256": SHA, "size": 5, "url": "ftp://x"}}}, "http(s)"),
    ],
)
def test_malformed_desired_state_is_refused_by_name(models: object, where: str) -> None:
    with pytest.raises(ValidationError) as e:
        DesiredState.model_validate(_desired(models))
    assert where in str(e.value)


def test_health_policy_refuses_unknown_keys() -> None:
    assert HealthPolicy.model_validate({"window_s": 5}).window_s == 5
    with pytest.raises(ValidationError, match="max_errors"):
        HealthPolicy.model_validate({"max_errors": 0.1})


def test_device_state_carries_outcomes_and_aliases() -> None:
    st = DeviceState.model_validate({
        "device": "d1", "group": "g", "models": {"cls": {"version": "1.0.0", "pending": {"from": "0.9.0", "to": "1.0.0"},
        "outcome": {"version": "1.0.0", "outcome": "rolled-back", "reason": "x", "ts": 1.0, "seqs": {"group:g": 3}}}},
        "last_rollback": {"model": "cls", "from": "1.0.0", "to": "0.9.0"},
    })  # fmt: skip
    m = st.model("cls")
    assert m.pending is not None and m.pending.from_version == "0.9.0"
    assert m.outcome is not None and m.outcome.outcome is UpdateOutcome.ROLLED_BACK and m.outcome.outcome.failed
    assert st.model("absent").served is None
    again = json.loads(wire(st))
    assert again["last_rollback"]["from"] == "1.0.0" and DeviceState.model_validate(again) == st
    assert dump(OutcomeRecord(version="1.0.0", outcome=UpdateOutcome.COMMITTED, ts=0.0))["outcome"] == "committed"
    with pytest.raises(ValidationError, match="surprise"):
        DeviceState.model_validate({"device": "d1", "surprise": 1})


def test_model_spec_defaults_are_inert() -> None:
    spec = ModelSpec()
    assert spec.version is None and not spec.allow_downgrade and spec.bundle is None
    assert BundleRef.model_validate({"sha256": SHA, "size": 5, "url": "https://x/b"}).chunks == []


def test_deeply_nested_json_is_refused_before_parsing() -> None:
    nested = b"[" * 5000 + b"]" * 5000  # json.loads alone raises RecursionError on deeper input
    with pytest.raises(WireError) as e:
        parse_json(nested, 1 << 20)
    assert e.value.reason == "too-deep"
    hidden = json.dumps({"s": "[" * 100}).encode()  # brackets inside strings do not count
    assert nesting_depth(hidden, 32) == 1 and parse_json(hidden, 1 << 20) == {"s": "[" * 100}
    with pytest.raises(WireError, match="oversized"):
        parse_json(b"{}" + b" " * 100, 10)
    with pytest.raises(WireError, match="malformed"):
        parse_json(b"{nope", 100)


def test_an_idle_window_is_unjudged_unless_no_traffic_was_required() -> None:
    from edge_runtime.contracts.fleet import VerdictKind
    from edge_runtime.device.agent.health_window import evaluate
    from edge_runtime.serving.stats import VersionStats

    idle = evaluate(HealthPolicy(min_inferences=20), None, VersionStats())
    assert idle.healthy and idle.kind is VerdictKind.IDLE and "unjudged" in idle.reason
    assert evaluate(HealthPolicy(min_inferences=0), None, VersionStats()).kind is VerdictKind.HEALTHY


def test_the_controller_fails_unjudged_devices_unless_told_otherwise() -> None:
    import time

    from edge_runtime.contracts.fleet import DeviceState, VerdictKind
    from edge_runtime.fleet.db import Rollout
    from edge_runtime.fleet.judging import verdict_of
    from edge_runtime.fleet.link import DeviceView
    from edge_runtime.fleet.params import RolloutParams

    now = time.time()
    r = Rollout(1, "cls", "2.0.0", "1.0.0", "g", "canary", {}, "running", 0, "", now, now, None)
    state = DeviceState.model_validate({
        "device": "d", "desired_seq": {"d": 5}, "models": {"cls": {"version": "2.0.0", "serving": "2.0.0",
        "outcome": {"version": "2.0.0", "outcome": "committed", "reason": "unjudged: 0 inferences", "ts": now,
                    "seqs": {"d": 5}, "verdict": VerdictKind.IDLE.value}}},
    })  # fmt: skip
    view = DeviceView("d", "g", True, now, state)
    device = {"scope": "d", "seq": 5, "moved": now, "status": "moved"}
    params = RolloutParams()
    params.validate("canary")
    assert verdict_of(r, params, device, view, None, now) == ("failed", "unjudged: 0 inferences (--unjudged fail)")
    params.unjudged = "pass"
    verdict = verdict_of(r, params, device, view, None, now)
    assert verdict is not None and verdict[0] == "passed"
