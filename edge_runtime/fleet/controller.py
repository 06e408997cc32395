"""The rollout controller's operator API: publish bundles, create and drive rollouts, promote,
abort, roll back; and the one path through which signed desired state is changed.

It moves a group of devices from one model version to another through signed desired state.
Each strategy's stepping lives in fleet/strategies/ (chosen through a registry); how devices are
judged and when a rollout is aborted lives in fleet/judging.py. The controller never talks to a
device directly: everything goes through retained, signed messages on the broker (fleet/link.py),
and everything it decides is written, with its reason, to the state file (fleet/db.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edge_runtime.contracts.bundle import load_public_keys, read_bundle
from edge_runtime.contracts.fleet import BundleRef, ModelSpec
from edge_runtime.fleet import judging
from edge_runtime.fleet.db import ControllerDB, Rollout
from edge_runtime.fleet.figures import brief, experiment_figures
from edge_runtime.fleet.link import FleetLink
from edge_runtime.fleet.params import STRATEGIES, FleetError, RolloutParams
from edge_runtime.fleet.publish import bundle_ref
from edge_runtime.fleet.strategies import EXPERIMENTS, NEEDS_SERVED_VERSION, stepper

log = logging.getLogger(__name__)

__all__ = ["STRATEGIES", "Controller", "FleetError", "RolloutParams"]


class Controller:
    """Owns the rollout lifecycle and every change of signed desired state. Never signs without
    recording the message (a restarted controller republishes it byte for byte) and never
    judges a device by anything but what the device itself reported."""

    def __init__(self, link: FleetLink, db: ControllerDB, say: Callable[[str], None] = lambda m: None) -> None:
        self.link, self.db, self.say = link, db, say

    # --- bundles ---------------------------------------------------------------------

    def publish(self, path: Path, trust: list[Path], url: str | None = None, chunks: bool = True) -> dict[str, Any]:
        """Verify the bundle against the trusted keys, then make it available: retained chunks on
        the broker and/or a URL (an S3-compatible bucket, a CDN, a file server)."""
        try:
            manifest = read_bundle(path, load_public_keys(trust), check_external_data=False).manifest
        except Exception as e:
            raise FleetError(f"{path} is not a bundle this fleet trusts: {e}") from e
        if not chunks and not url:
            raise FleetError("a bundle needs MQTT chunks or a --url (or both)")
        try:
            ref = self.link.publish_bundle(path) if chunks else bundle_ref(path, chunked=False, url=url)
            if url:
                ref = BundleRef.model_validate({**ref.model_dump(), "url": url})
        except ValidationError as e:
            raise FleetError(f"--url {url!r} is refused: {e.errors()[0]['msg']}") from None
        self.db.add_bundle(manifest.name, manifest.version, manifest.target, ref)
        info = {
            "name": manifest.name,
            "version": manifest.version,
            "target": manifest.target,
            "sha256": ref.sha256,
            "size": ref.size,
            "chunks": len(ref.chunks),
            "url": url,
        }
        return info

    # --- rollouts --------------------------------------------------------------------

    def create(self, name: str, version: str, group: str, strategy: str, params: RolloutParams) -> int:
        params.validate(strategy)
        ref = self.db.bundle(name, version)
        if ref is None:
            raise FleetError(f"{name} {version} was not published; run `edgert fleet publish BUNDLE` first")
        deadline = time.monotonic() + 10  # a device that just came online reports its state within seconds
        while (devices := self.link.group(group)) and any(v.online and not v.state for v in devices):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if not devices:
            raise FleetError(f"no device of group {group!r} has reported to the broker")
        serving = [v.serving(name) for v in devices if v.serving(name)]
        from_version = max(set(serving), key=serving.count) if serving else None
        if strategy in NEEDS_SERVED_VERSION and from_version is None:
            raise FleetError(f"{strategy} needs devices already serving {name}; none of group {group!r} does")
        if from_version == version:
            raise FleetError(f"group {group!r} already serves {name} {version}")
        try:
            rid = self.db.create_rollout(name, version, from_version, group, strategy, asdict(params), len(devices))
        except RuntimeError as e:
            raise FleetError(str(e)) from e
        online = sum(v.online for v in devices)
        self.decide(
            rid,
            f"created: {strategy} of {name} {from_version} -> {version} to group {group} "
            f"({len(devices)} devices, {online} online)",
        )
        return rid

    def resolve(self, rid: int | None, active: bool = True) -> Rollout:
        if rid is not None:
            r = self.db.rollout(rid)
            if r is None:
                raise FleetError(f"no rollout {rid} in {self.db.path}")
            return r
        candidates = self.db.rollouts(active_only=active)
        if not candidates:
            raise FleetError("no active rollout" if active else f"no rollout in {self.db.path}")
        return candidates[-1]

    def drive(
        self,
        rid: int,
        tick: float = 0.3,
        progress: Callable[[Rollout], None] | None = None,
        until_observing: bool = True,
    ) -> Rollout:
        """Step the rollout until it ends (or, for shadow/ab, until it is observing)."""
        r = self.resolve(rid)
        if r.driven:  # a restarted controller: the same signed messages again
            n = self.link.republish([f"group:{r.group}", *r.devices])
            self.decide(rid, f"controller resumed: republished the last signed desired state of {n} scopes")
        else:
            self.db.set_rollout(r.id, driven=1)
        while True:
            r = self.step(rid)
            if progress:
                progress(r)
            if not r.active or (until_observing and r.status == "observing"):
                return r
            time.sleep(tick)

    def step(self, rid: int) -> Rollout:
        r = self.resolve(rid)
        if not r.active:
            return r
        if r.status == "aborting":  # an abort that died half way: finish it
            self.revert(r, r.reason)
            return self.resolve(rid)
        stepper(r.strategy)(self, r, RolloutParams.stored(r.params))
        return self.resolve(rid)

    def promote(self, rid: int | None) -> Rollout:
        r = self.resolve(rid)
        if r.strategy not in EXPERIMENTS or r.status != "observing":
            raise FleetError(
                f"rollout {r.id} is a {r.strategy} rollout in status {r.status}; only an observing "
                "shadow or A/B rollout can be promoted"
            )
        p = RolloutParams.stored(r.params)
        figures = self.experiment_figures(r)
        seq = self.set_group(r, self.spec(r, r.version, p))
        for v in self.link.group(r.group):
            if v.online:
                self.db.move_device(r.id, v.id, 1, f"group:{r.group}", seq, v.serving(r.name))
        self.db.set_rollout(r.id, status="running", phase=1)
        self.decide(r.id, f"promoted {r.version} by the operator; figures then: {json.dumps(brief(figures))}")
        return self.resolve(r.id)

    def experiment_figures(self, r: Rollout) -> dict[str, Any]:
        """Per-version figures summed over the devices of the group (and each device's own)."""
        return experiment_figures(r, self.link.group(r.group))

    # --- judging and aborting --------------------------------------------------------

    def judge(self, r: Rollout, p: RolloutParams, ready: judging.Ready | None = None) -> None:
        judging.judge(r, p, self.link, self.db, self.decide, ready)

    def abort_if_bad(self, r: Rollout, p: RolloutParams) -> bool:
        reason = judging.abort_reason(r, p, self.link)
        if reason is not None:
            self.revert(r, reason)
        return reason is not None

    def finish(self, r: Rollout) -> None:
        overrides = [dev for dev, d in r.devices.items() if d["scope"] == dev]
        for dev in overrides:  # the group's desired state now says the same: hand devices back to it
            self.set_scope(dev, r.name, None)
        devices = self.link.group(r.group)
        offline = [v.id for v in devices if v.serving(r.name) != r.version and not v.online]
        failed = [dev for dev, d in r.devices.items() if d["status"] == "failed"]
        passed = sum(d["status"] == "passed" for d in r.devices.values())
        msg = f"completed: {passed} devices passed their health window on {r.version}"
        if failed:
            msg += f"; {len(failed)} failed it and kept their version ({', '.join(sorted(failed)[:10])})"
        if offline:
            msg += f"; {len(offline)} offline ({', '.join(offline[:10])}) converge on reconnect"
        self.decide(r.id, msg)
        self.db.set_rollout(r.id, status="completed", reason=msg)

    def abort(self, rid: int | None, reason: str = "aborted by the operator") -> Rollout:
        r = self.resolve(rid)
        self.revert(r, reason)
        return self.resolve(r.id)

    def rollback(self, rid: int | None) -> Rollout:
        """Undo a finished rollout: the group back to the version it came from."""
        r = self.resolve(rid, active=False)
        if r.active:
            return self.abort(r.id, "rolled back by the operator during the rollout")
        if r.status != "completed":
            raise FleetError(f"rollout {r.id} is {r.status}: nothing to roll back")
        if r.from_version is None:
            raise FleetError(f"rollout {r.id} started from no version: nothing to go back to")
        self.set_group(r, self.spec(r, r.from_version, None).model_copy(update={"allow_downgrade": True}))
        self.decide(r.id, f"rolled back by the operator: the group's desired state is {r.from_version} again")
        self.db.set_rollout(r.id, status="rolled-back", reason="rolled back by the operator")
        return self.resolve(r.id)

    def revert(self, r: Rollout, reason: str) -> None:
        self.db.set_rollout(r.id, status="aborting", reason=reason)
        self.decide(r.id, f"ABORT: {reason}")
        if r.from_version is None:
            self.set_group(r, None)
        else:
            self.set_group(r, self.spec(r, r.from_version, None).model_copy(update={"allow_downgrade": True}))
        for dev, d in r.devices.items():
            if d["scope"] == dev:
                self.set_scope(dev, r.name, None)  # back to the group's (old) desired state
        self.decide(
            r.id, f"rollback published: group {r.group} back to {r.from_version}; {len(r.devices)} devices had moved"
        )
        self.db.set_rollout(r.id, status="aborted", reason=reason)

    # --- desired state ---------------------------------------------------------------

    def spec(self, r: Rollout, version: str | None, p: RolloutParams | None) -> ModelSpec:
        return ModelSpec(
            version=version,
            bundle=self.db.bundle(r.name, version or ""),
            health=p.health() if p is not None else None,
        )

    def _models(self, scope: str) -> dict[str, ModelSpec]:
        msgs = self.db.messages([scope])
        if not msgs:
            return {}
        models = json.loads(msgs[0][2])["payload"].get("models", {})
        return {name: ModelSpec.model_validate(spec) for name, spec in models.items()}

    def set_scope(self, scope: str, name: str, spec: ModelSpec | None) -> int:
        """Change one model's entry in a scope's desired state, keeping the other models'."""
        models = self._models(scope)
        if spec is None:
            models.pop(name, None)
        else:
            models[name] = spec
        return self.link.desired(scope, models)

    def set_group(self, r: Rollout, spec: ModelSpec | None) -> int:
        return self.set_scope(f"group:{r.group}", r.name, spec)

    def decide(self, rid: int, message: str) -> None:
        log.info("rollout %d: %s", rid, message)
        self.db.decide(rid, message)
        self.say(message)
