"""Shadow and A/B: the new version runs beside the served one on every device (shadow: same
inputs, serving nothing; A/B: a share of the requests), per-version figures are summed across
the group, and the operator promotes it (then it rolls out like a staged rollout's last stage)
or drops it. A variant whose error rate is over the limit is dropped automatically."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_runtime.contracts.fleet import ExperimentKind, ExperimentSpec
from edge_runtime.fleet.db import Rollout
from edge_runtime.fleet.params import RolloutParams

if TYPE_CHECKING:
    from edge_runtime.fleet.controller import Controller


def step(ctl: Controller, r: Rollout, p: RolloutParams) -> None:
    if r.phase == 0:
        if not r.group_published:
            spec = ctl.spec(r, r.from_version, None)
            spec.experiment = ExperimentSpec(
                kind=ExperimentKind(r.strategy),
                version=r.version,
                bundle=ctl.db.bundle(r.name, r.version),
                split=p.split / 100 if r.strategy == "ab" else 0.0,
            )
            ctl.set_group(r, spec)
            ctl.db.set_rollout(r.id, group_published=1, status="observing")
            what = "runs beside it on the same inputs" if r.strategy == "shadow" else f"serves {p.split:g}%"
            ctl.decide(
                r.id,
                f"{r.strategy}: {r.version} {what} of {r.from_version}'s traffic on every device; promote or abort",
            )
            return
        figures = ctl.experiment_figures(r)
        new = figures["variants"].get(r.version, {})
        devices = figures["devices_reporting"]
        if (
            devices >= p.min_devices
            and new.get("rows", 0) >= p.min_inferences
            and (new.get("error_rate") or 0) > p.max_error_rate
        ):
            ctl.revert(
                r,
                f"{r.version} error rate {new['error_rate']:.1%} over {p.max_error_rate:.1%} "
                f"across {devices} devices ({r.strategy}); dropped",
            )
        return
    ctl.judge(r, p)  # phase 1: promoted, an update like the last stage of a staged rollout
    r = ctl.resolve(r.id)
    if ctl.abort_if_bad(r, p) or any(d["status"] == "moved" for d in r.devices.values()):
        return
    ctl.finish(r)
