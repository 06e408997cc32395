"""Canary and staged rollouts: move a growing share of the group, device by device (each through
its own signed desired state), judge each stage, then hand the whole group the new version."""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

from edge_runtime.fleet.db import Rollout
from edge_runtime.fleet.params import RolloutParams

if TYPE_CHECKING:
    from edge_runtime.fleet.controller import Controller


def step(ctl: Controller, r: Rollout, p: RolloutParams) -> None:
    ctl.judge(r, p)
    r = ctl.resolve(r.id)
    if ctl.abort_if_bad(r, p):
        return
    stage = r.phase
    final = stage >= len(p.steps) - 1
    target = math.ceil(p.steps[min(stage, len(p.steps) - 1)] / 100 * max(r.population, 1))
    if final and not r.group_published:
        seq = ctl.set_group(r, ctl.spec(r, r.version, p))
        for v in ctl.link.group(r.group):
            if v.id not in r.devices and v.online:
                ctl.db.move_device(r.id, v.id, stage, f"group:{r.group}", seq, v.serving(r.name))
        ctl.db.set_rollout(r.id, group_published=1)
        ctl.decide(
            r.id,
            f"stage {stage + 1}/{len(p.steps)} (100%): the group's desired state is now "
            f"{r.version}; devices offline now converge when they reconnect",
        )
        return
    if not final and len(r.devices) < target:
        order = sorted(
            (v for v in ctl.link.group(r.group) if v.online and v.id not in r.devices),
            key=lambda v: hashlib.sha256(f"{r.id}/{v.id}".encode()).hexdigest(),
        )
        chosen = order[: target - len(r.devices)]
        for v in chosen:
            seq = ctl.set_scope(v.id, r.name, ctl.spec(r, r.version, p))
            ctl.db.move_device(r.id, v.id, stage, v.id, seq, v.serving(r.name))
        if chosen:
            ctl.decide(
                r.id,
                f"stage {stage + 1}/{len(p.steps)} ({p.steps[stage]:g}%): moved {', '.join(v.id for v in chosen)}",
            )
            return
    if any(d["status"] == "moved" for d in r.devices.values()):
        return
    passed = sum(d["status"] == "passed" for d in r.devices.values())
    in_stage = [d for d in r.devices.values() if d["stage"] == stage]
    need = min(p.min_devices, len(r.devices))
    if passed < need and not final:
        if not in_stage and not any(v.online and v.id not in r.devices for v in ctl.link.group(r.group)):
            ctl.decide(r.id, f"stage {stage + 1}: no online device left to move; going on")
        else:
            return
    if final:
        ctl.finish(r)
        return
    ctl.decide(
        r.id,
        f"stage {stage + 1}/{len(p.steps)} ({p.steps[stage]:g}%) passed: "
        f"{passed} of {len(r.devices)} moved devices healthy",
    )
    ctl.db.set_rollout(r.id, phase=stage + 1)
