"""Judging moved devices, and the automatic abort policy.

How a device is judged, from its retained state (never from a clock on the device):

    passed   it reports the target version committed, for a desired state at least as new as the
             one the controller published for it (the seqs travel with the outcome)
    failed   it reports the target rolled back or refused for that desired state, went offline
             during its health window, or gave no verdict within the stage timeout

Automatic abort: once at least --min-devices devices were judged and the failed share exceeds
--max-failure-rate, or the new version's error rate across devices exceeds --max-error-rate, or
its median p95 ratio exceeds --max-p95-ratio, the rollout is reverted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from edge_runtime.contracts.fleet import UpdateOutcome, VerdictKind
from edge_runtime.fleet.db import ControllerDB, Rollout
from edge_runtime.fleet.link import DeviceView, FleetLink
from edge_runtime.fleet.params import RolloutParams

Ready = Callable[[DeviceView], bool]


def verdict_of(
    r: Rollout, p: RolloutParams, device: dict[str, object], v: DeviceView, ready: Ready | None, now: float
) -> tuple[str, str] | None:
    """A moved device's verdict ("passed"/"failed", why), or None while it is still pending."""
    m = v.model(r.name)
    outcome = m.outcome
    scope, seq = str(device["scope"]), int(device["seq"])  # type: ignore[call-overload]
    answered = outcome is not None and outcome.seqs.get(scope, -1) >= seq
    seen = v.state is not None and v.state.desired_seq.get(scope, -1) >= seq
    on_target = outcome is not None and outcome.version == r.version
    if outcome is not None and answered and on_target and outcome.outcome is not UpdateOutcome.COMMITTED:
        return ("failed", f"{outcome.outcome.value}: {outcome.reason}")
    if outcome is not None and answered and on_target and outcome.verdict is VerdictKind.IDLE:
        if p.unjudged == "pass":
            return ("passed", f"{outcome.reason}; counted as a pass (--unjudged pass)")
        return ("failed", f"{outcome.reason} (--unjudged fail)")
    if ready is not None and seen and ready(v):
        return ("passed", "ready")
    if (
        ready is None
        and seen
        and v.serving(r.name) == r.version
        and m.pending is None
        and ((answered and on_target) or m.version == r.version)
    ):
        return ("passed", "healthy")
    if not v.online:
        return ("failed", "went offline before its verdict")
    if now - float(device["moved"]) > p.stage_timeout:  # type: ignore[arg-type]
        return ("failed", f"no verdict within {p.stage_timeout:.0f} s")
    return None


def judge(
    r: Rollout,
    p: RolloutParams,
    link: FleetLink,
    db: ControllerDB,
    decide: Callable[[int, str], None],
    ready: Ready | None = None,
) -> None:
    now = time.time()
    for dev, d in r.devices.items():
        if d["status"] != "moved":
            continue
        v = link.view(dev)
        if v is None:
            continue
        verdict = verdict_of(r, p, d, v, ready, now)
        if verdict is None:
            continue
        db.judge_device(r.id, dev, *verdict)
        decide(r.id, f"{dev}: {verdict[0]} ({verdict[1]})")


def abort_reason(r: Rollout, p: RolloutParams, link: FleetLink) -> str | None:
    """Why the rollout must be reverted now, or None."""
    judged = [d for d in r.devices.values() if d["status"] in ("passed", "failed")]
    failed = [d for d in judged if d["status"] == "failed"]
    if len(judged) >= p.min_devices and len(failed) / len(judged) > p.max_failure_rate:
        reasons = sorted({str(d["reason"]).split(":")[0] for d in failed})
        return (
            f"{len(failed)} of {len(judged)} judged devices failed ({', '.join(reasons)}), over "
            f"the {p.max_failure_rate:.0%} allowed"
        )
    rows = errors = reporting = 0
    ratios = []
    for dev in r.devices:
        v = link.view(dev)
        if v is None or v.serving(r.name) != r.version:
            continue
        m = v.model(r.name)
        if m.live is not None and m.live.rows:
            reporting += 1
            rows += m.live.rows
            errors += m.live.errors + m.live.nonfinite
        figs = m.outcome.figures if m.outcome is not None else None
        if figs is not None and figs.p95_ratio is not None:
            # Below the absolute floor a ratio is noise (0.1 ms -> 0.3 ms is "3x"): counted as 1.
            noise = (figs.p95_increase_ms or 0.0) <= p.min_p95_increase_ms
            ratios.append(1.0 if noise else figs.p95_ratio)
    if reporting >= p.min_devices and rows >= p.min_inferences and errors / rows > p.max_error_rate:
        return f"{r.version} error rate {errors / rows:.1%} across {reporting} devices, over {p.max_error_rate:.1%}"
    if len(ratios) >= p.min_devices and statistics.median(ratios) > p.max_p95_ratio:
        return (
            f"{r.version} median p95 {statistics.median(ratios):.1f}x the old version's across "
            f"{len(ratios)} devices, over {p.max_p95_ratio}x"
        )
    return None
