"""Blue-green: every device loads and warms the new version beside the old one (standby); once all
are ready, the whole group switches at once and the old version stays warm for an instant switch
back (`edgert fleet rollback`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_runtime.contracts.fleet import StandbySpec
from edge_runtime.fleet.db import Rollout
from edge_runtime.fleet.params import RolloutParams

if TYPE_CHECKING:
    from edge_runtime.fleet.controller import Controller


def step(ctl: Controller, r: Rollout, p: RolloutParams) -> None:
    group = f"group:{r.group}"
    if r.phase == 0:
        if not r.group_published:
            spec = ctl.spec(r, r.from_version, None)
            spec.standby = StandbySpec(version=r.version, bundle=ctl.db.bundle(r.name, r.version))
            seq = ctl.set_group(r, spec)
            for v in ctl.link.group(r.group):
                if v.online:
                    ctl.db.move_device(r.id, v.id, 0, group, seq, v.serving(r.name))
            ctl.db.set_rollout(r.id, group_published=1)
            ctl.decide(r.id, f"blue-green: every device loads and warms {r.version} beside {r.from_version}")
            return
        ctl.judge(r, p, ready=lambda v: v.model(r.name).standby == r.version)
        r = ctl.resolve(r.id)
        if ctl.abort_if_bad(r, p) or any(d["status"] == "moved" for d in r.devices.values()):
            return
        ready = [dev for dev, d in r.devices.items() if d["status"] == "passed"]
        spec = ctl.spec(r, r.version, p)
        spec.standby = StandbySpec(version=r.from_version or "", bundle=ctl.db.bundle(r.name, r.from_version or ""))
        seq = ctl.set_group(r, spec)
        for dev in ready:
            ctl.db.move_device(r.id, dev, 1, group, seq, r.devices[dev]["from_version"])
        ctl.db.set_rollout(r.id, phase=1)
        ctl.decide(r.id, f"blue-green: {len(ready)} devices warm; the whole group switches to {r.version} now")
        return
    ctl.judge(r, p)
    r = ctl.resolve(r.id)
    if ctl.abort_if_bad(r, p) or any(d["status"] == "moved" for d in r.devices.values()):
        return
    passed = sum(d["status"] == "passed" for d in r.devices.values())
    msg = (
        f"completed: {passed} devices switched to {r.version}; {r.from_version} stays warm as the standby "
        "(`edgert fleet rollback` switches back instantly)"
    )
    ctl.decide(r.id, msg)
    ctl.db.set_rollout(r.id, status="completed", reason=msg)
