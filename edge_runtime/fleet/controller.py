"""The rollout controller: moves a group of devices from one model version to another through
signed desired state, judges every moved device by what it reports, and aborts fleet-wide.

Strategies (README "Fleet rollouts"):

    canary      a first share of the group (--steps, default 10 then 100), then the rest
    staged      a list of percentages (default 1,10,50,100); each stage waits for at least
                --min-devices devices (or all it moved, when fewer) to pass their health window
    blue-green  every device loads and warms the new version beside the old (standby), then the
                whole group switches at once; the old version stays warm: switching back is instant
    shadow      devices run the new version on the same inputs without serving it and report
                agreement; the operator promotes or drops it
    ab          a share (--split) of each device's requests is served by the new version;
                per-variant figures side by side; promote or drop

How a device is judged, from its retained state (never from a clock on the device):

    passed   it reports the target version committed, for a desired state at least as new as the
             one the controller published for it (the seqs travel with the outcome)
    failed   it reports the target rolled back or refused for that desired state, went offline
             during its health window, or gave no verdict within the stage timeout

Automatic abort: once at least --min-devices devices were judged and the failed share exceeds
--max-failure-rate, or the new version's error rate across devices exceeds --max-error-rate, or
its median p95 ratio exceeds --max-p95-ratio, the controller publishes a signed rollback (the
group's desired state back to the old version, downgrade allowed, device overrides cleared) and
logs why. Devices offline at that moment converge when they reconnect (retained state).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.contracts.bundle import load_public_keys, read_bundle
from edge_runtime.fleet.db import ControllerDB, Rollout
from edge_runtime.fleet.figures import brief, experiment_figures
from edge_runtime.fleet.link import DeviceView, FleetLink
from edge_runtime.fleet.publish import bundle_ref

log = logging.getLogger(__name__)

STRATEGIES = ("canary", "staged", "blue-green", "shadow", "ab")
DEFAULT_STEPS = {"canary": [10.0, 100.0], "staged": [1.0, 10.0, 50.0, 100.0]}


class FleetError(Exception):
    """A controller request that cannot be carried out; the message says why."""


@dataclass
class RolloutParams:
    steps: list[float] = field(default_factory=list)
    min_devices: int = 3
    max_failure_rate: float = 0.2
    health_window: float = 30.0
    min_inferences: int = 20
    stage_timeout: float = 0.0  # 0: 3 health windows + 60 s
    split: float = 10.0  # ab: percent of requests to the new version
    max_error_rate: float = 0.05
    max_p95_ratio: float = 3.0
    min_p95_increase_ms: float = 0.5  # a p95 ratio counts only above this absolute increase

    @classmethod
    def stored(cls, params: dict[str, Any]) -> RolloutParams:
        """The parameters as saved with a rollout (which also holds controller bookkeeping)."""
        return cls(**{k: v for k, v in params.items() if k in cls.__dataclass_fields__})

    def validate(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise FleetError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if strategy in DEFAULT_STEPS:
            if not self.steps:
                self.steps = list(DEFAULT_STEPS[strategy])
            if any(not 0 < s <= 100 for s in self.steps) or self.steps != sorted(self.steps):
                raise FleetError(f"--steps must be increasing percentages in (0, 100], got {self.steps}")
            if self.steps[-1] != 100:
                self.steps.append(100.0)
        if not 0 <= self.max_failure_rate <= 1:
            raise FleetError(f"--max-failure-rate is a share in [0, 1], got {self.max_failure_rate}")
        if not 0 < self.split < 100:
            raise FleetError(f"--split is a percentage in (0, 100), got {self.split}")
        if self.health_window <= 0 or self.min_devices < 1:
            raise FleetError("--health-window must be > 0 and --min-devices >= 1")
        if not self.stage_timeout:
            self.stage_timeout = 3 * self.health_window + 60

    def health(self) -> dict[str, Any]:
        return {
            "window_s": self.health_window,
            "min_inferences": self.min_inferences,
            "max_p95_ratio": self.max_p95_ratio,
            "min_p95_increase_ms": self.min_p95_increase_ms,
        }


class Controller:
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
        ref = self.link.publish_bundle(path) if chunks else bundle_ref(path, chunked=False)
        if url:
            ref["url"] = url
        self.db.add_bundle(manifest.name, manifest.version, manifest.target, ref)
        info = {
            "name": manifest.name,
            "version": manifest.version,
            "target": manifest.target,
            "sha256": ref["sha256"],
            "size": ref["size"],
            "chunks": len(ref.get("chunks", [])),
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
        if strategy in ("blue-green", "shadow", "ab") and from_version is None:
            raise FleetError(f"{strategy} needs devices already serving {name}; none of group {group!r} does")
        if from_version == version:
            raise FleetError(f"group {group!r} already serves {name} {version}")
        stored = {**asdict(params), "population": len(devices)}
        try:
            rid = self.db.create_rollout(name, version, from_version, group, strategy, stored)
        except RuntimeError as e:
            raise FleetError(str(e)) from e
        online = sum(v.online for v in devices)
        self._decide(
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
        if r.params.get("driven"):  # a restarted controller: the same signed messages again
            n = self.link.republish([f"group:{r.group}", *r.devices])
            self._decide(rid, f"controller resumed: republished the last signed desired state of {n} scopes")
        else:
            self._params(r, driven=True)
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
            self._revert(r, r.reason)
            return self.resolve(rid)
        p = RolloutParams.stored(r.params)
        if r.strategy in ("canary", "staged"):
            self._step_staged(r, p)
        elif r.strategy == "blue-green":
            self._step_blue_green(r, p)
        else:
            self._step_experiment(r, p)
        return self.resolve(rid)

    # --- canary and staged -----------------------------------------------------------

    def _step_staged(self, r: Rollout, p: RolloutParams) -> None:
        self._judge(r, p)
        r = self.resolve(r.id)
        if self._abort_if_bad(r, p):
            return
        stage = r.phase
        final = stage >= len(p.steps) - 1
        target = math.ceil(p.steps[min(stage, len(p.steps) - 1)] / 100 * max(r.params["population"], 1))
        if final and not r.params.get("group_published"):
            seq = self._set_group(r, self._spec(r, r.version, p))
            for v in self.link.group(r.group):
                if v.id not in r.devices and v.online:
                    self.db.move_device(r.id, v.id, stage, f"group:{r.group}", seq, v.serving(r.name))
            self._params(r, group_published=True)
            self._decide(
                r.id,
                f"stage {stage + 1}/{len(p.steps)} (100%): the group's desired state is now "
                f"{r.version}; devices offline now converge when they reconnect",
            )
            return
        if not final and len(r.devices) < target:
            order = sorted(
                (v for v in self.link.group(r.group) if v.online and v.id not in r.devices),
                key=lambda v: hashlib.sha256(f"{r.id}/{v.id}".encode()).hexdigest(),
            )
            chosen = order[: target - len(r.devices)]
            for v in chosen:
                seq = self._set_scope(v.id, r.name, self._spec(r, r.version, p))
                self.db.move_device(r.id, v.id, stage, v.id, seq, v.serving(r.name))
            if chosen:
                self._decide(
                    r.id,
                    f"stage {stage + 1}/{len(p.steps)} ({p.steps[stage]:g}%): moved {', '.join(v.id for v in chosen)}",
                )
                return
        waiting = [d for d in r.devices.values() if d["status"] == "moved"]
        if waiting:
            return
        passed = sum(d["status"] == "passed" for d in r.devices.values())
        in_stage = [d for d in r.devices.values() if d["stage"] == stage]
        need = min(p.min_devices, len(r.devices))
        if passed < need and not final:
            if not in_stage and not any(v.online and v.id not in r.devices for v in self.link.group(r.group)):
                self._decide(r.id, f"stage {stage + 1}: no online device left to move; going on")
            else:
                return
        if final:
            self._finish(r, p)
            return
        self._decide(
            r.id,
            f"stage {stage + 1}/{len(p.steps)} ({p.steps[stage]:g}%) passed: "
            f"{passed} of {len(r.devices)} moved devices healthy",
        )
        self.db.set_rollout(r.id, phase=stage + 1)

    def _finish(self, r: Rollout, p: RolloutParams) -> None:
        overrides = [dev for dev, d in r.devices.items() if d["scope"] == dev]
        for dev in overrides:  # the group's desired state now says the same: hand devices back to it
            self._set_scope(dev, r.name, None)
        devices = self.link.group(r.group)
        offline = [v.id for v in devices if v.serving(r.name) != r.version and not v.online]
        failed = [dev for dev, d in r.devices.items() if d["status"] == "failed"]
        passed = sum(d["status"] == "passed" for d in r.devices.values())
        msg = f"completed: {passed} devices passed their health window on {r.version}"
        if failed:
            msg += f"; {len(failed)} failed it and kept their version ({', '.join(sorted(failed)[:10])})"
        if offline:
            msg += f"; {len(offline)} offline ({', '.join(offline[:10])}) converge on reconnect"
        self._decide(r.id, msg)
        self.db.set_rollout(r.id, status="completed", reason=msg)

    # --- blue-green ------------------------------------------------------------------

    def _step_blue_green(self, r: Rollout, p: RolloutParams) -> None:
        group = f"group:{r.group}"
        if r.phase == 0:
            if not r.params.get("group_published"):
                spec = self._spec(r, r.from_version, None)
                spec["standby"] = {"version": r.version, "bundle": self.db.bundle(r.name, r.version)}
                seq = self._set_group(r, spec)
                for v in self.link.group(r.group):
                    if v.online:
                        self.db.move_device(r.id, v.id, 0, group, seq, v.serving(r.name))
                self._params(r, group_published=True)
                self._decide(r.id, f"blue-green: every device loads and warms {r.version} beside {r.from_version}")
                return
            self._judge(r, p, ready=lambda v: v.model(r.name).get("standby") == r.version)
            r = self.resolve(r.id)
            if self._abort_if_bad(r, p) or any(d["status"] == "moved" for d in r.devices.values()):
                return
            ready = [dev for dev, d in r.devices.items() if d["status"] == "passed"]
            spec = self._spec(r, r.version, p)
            spec["standby"] = {"version": r.from_version, "bundle": self.db.bundle(r.name, r.from_version or "")}
            seq = self._set_group(r, spec)
            for dev in ready:
                self.db.move_device(r.id, dev, 1, group, seq, r.devices[dev]["from_version"])
            self.db.set_rollout(r.id, phase=1)
            self._decide(r.id, f"blue-green: {len(ready)} devices warm; the whole group switches to {r.version} now")
            return
        self._judge(r, p)
        r = self.resolve(r.id)
        if self._abort_if_bad(r, p) or any(d["status"] == "moved" for d in r.devices.values()):
            return
        passed = sum(d["status"] == "passed" for d in r.devices.values())
        msg = (
            f"completed: {passed} devices switched to {r.version}; {r.from_version} stays warm as the standby "
            "(`edgert fleet rollback` switches back instantly)"
        )
        self._decide(r.id, msg)
        self.db.set_rollout(r.id, status="completed", reason=msg)

    # --- shadow and A/B --------------------------------------------------------------

    def _step_experiment(self, r: Rollout, p: RolloutParams) -> None:
        if r.phase == 0:
            if not r.params.get("group_published"):
                spec = self._spec(r, r.from_version, None)
                spec["experiment"] = {
                    "kind": r.strategy,
                    "version": r.version,
                    "bundle": self.db.bundle(r.name, r.version),
                    "split": p.split / 100 if r.strategy == "ab" else 0.0,
                }
                self._set_group(r, spec)
                self._params(r, group_published=True)
                self.db.set_rollout(r.id, status="observing")
                what = "runs beside it on the same inputs" if r.strategy == "shadow" else f"serves {p.split:g}%"
                self._decide(
                    r.id,
                    f"{r.strategy}: {r.version} {what} of {r.from_version}'s traffic on every device; promote or abort",
                )
                return
            figures = self.experiment_figures(r)
            new = figures["variants"].get(r.version, {})
            devices = figures["devices_reporting"]
            if (
                devices >= p.min_devices
                and new.get("rows", 0) >= p.min_inferences
                and (new.get("error_rate") or 0) > p.max_error_rate
            ):
                self._revert(
                    r,
                    f"{r.version} error rate {new['error_rate']:.1%} over {p.max_error_rate:.1%} "
                    f"across {devices} devices ({r.strategy}); dropped",
                )
            return
        self._judge(r, p)  # phase 1: promoted, an update like the last stage of a staged rollout
        r = self.resolve(r.id)
        if self._abort_if_bad(r, p) or any(d["status"] == "moved" for d in r.devices.values()):
            return
        self._finish(r, p)

    def promote(self, rid: int | None) -> Rollout:
        r = self.resolve(rid)
        if r.strategy not in ("shadow", "ab") or r.status != "observing":
            raise FleetError(
                f"rollout {r.id} is a {r.strategy} rollout in status {r.status}; only an observing "
                "shadow or A/B rollout can be promoted"
            )
        p = RolloutParams.stored(r.params)
        figures = self.experiment_figures(r)
        seq = self._set_group(r, self._spec(r, r.version, p))
        for v in self.link.group(r.group):
            if v.online:
                self.db.move_device(r.id, v.id, 1, f"group:{r.group}", seq, v.serving(r.name))
        self.db.set_rollout(r.id, status="running", phase=1)
        self._decide(r.id, f"promoted {r.version} by the operator; figures then: {json.dumps(brief(figures))}")
        return self.resolve(r.id)

    def experiment_figures(self, r: Rollout) -> dict[str, Any]:
        """Per-version figures summed over the devices of the group (and each device's own)."""
        return experiment_figures(r, self.link.group(r.group))

    # --- judging and aborting --------------------------------------------------------

    def _judge(self, r: Rollout, p: RolloutParams, ready: Callable[[DeviceView], bool] | None = None) -> None:
        now = time.time()
        for dev, d in r.devices.items():
            if d["status"] != "moved":
                continue
            v = self.link.view(dev)
            if v is None:
                continue
            m = v.model(r.name)
            raw = m.get("outcome")
            outcome: dict[str, Any] = raw if isinstance(raw, dict) else {}
            answered = (outcome.get("seqs") or {}).get(d["scope"], -1) >= d["seq"]
            seen = (v.state.get("desired_seq") or {}).get(d["scope"], -1) >= d["seq"]
            on_target = outcome.get("version") == r.version
            if answered and on_target and outcome.get("outcome") != "committed":
                verdict = ("failed", f"{outcome.get('outcome')}: {outcome.get('reason')}")
            elif ready is not None and seen and ready(v):
                verdict = ("passed", "ready")
            elif (
                ready is None
                and seen
                and v.serving(r.name) == r.version
                and not m.get("pending")
                and ((answered and on_target) or m.get("version") == r.version)
            ):
                verdict = ("passed", "healthy")
            elif not v.online:
                verdict = ("failed", "went offline before its verdict")
            elif now - d["moved"] > p.stage_timeout:
                verdict = ("failed", f"no verdict within {p.stage_timeout:.0f} s")
            else:
                continue
            self.db.judge_device(r.id, dev, *verdict)
            self._decide(r.id, f"{dev}: {verdict[0]} ({verdict[1]})")

    def _abort_if_bad(self, r: Rollout, p: RolloutParams) -> bool:
        judged = [d for d in r.devices.values() if d["status"] in ("passed", "failed")]
        failed = [d for d in judged if d["status"] == "failed"]
        if len(judged) >= p.min_devices and len(failed) / len(judged) > p.max_failure_rate:
            reasons = sorted({d["reason"].split(":")[0] for d in failed})
            self._revert(
                r,
                f"{len(failed)} of {len(judged)} judged devices failed ({', '.join(reasons)}), over "
                f"the {p.max_failure_rate:.0%} allowed",
            )
            return True
        rows = errors = 0
        ratios = []
        reporting = 0
        for dev in r.devices:
            v = self.link.view(dev)
            if v is None or v.serving(r.name) != r.version:
                continue
            live = v.model(r.name).get("live") or {}
            if int(live.get("rows") or 0):
                reporting += 1
                rows += int(live.get("rows") or 0)
                errors += int(live.get("errors") or 0) + int(live.get("nonfinite") or 0)
            figs = (v.model(r.name).get("outcome") or {}).get("figures") or {}
            if figs.get("p95_ratio") is not None:
                # Below the absolute floor a ratio is noise (0.1 ms -> 0.3 ms is "3x"): counted as 1.
                noise = float(figs.get("p95_increase_ms") or 0.0) <= p.min_p95_increase_ms
                ratios.append(1.0 if noise else float(figs["p95_ratio"]))
        if reporting >= p.min_devices and rows >= p.min_inferences and errors / rows > p.max_error_rate:
            self._revert(
                r, f"{r.version} error rate {errors / rows:.1%} across {reporting} devices, over {p.max_error_rate:.1%}"
            )
            return True
        if len(ratios) >= p.min_devices and statistics.median(ratios) > p.max_p95_ratio:
            self._revert(
                r,
                f"{r.version} median p95 {statistics.median(ratios):.1f}x the old version's across "
                f"{len(ratios)} devices, over {p.max_p95_ratio}x",
            )
            return True
        return False

    def abort(self, rid: int | None, reason: str = "aborted by the operator") -> Rollout:
        r = self.resolve(rid)
        self._revert(r, reason)
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
        self._set_group(r, {**self._spec(r, r.from_version, None), "allow_downgrade": True})
        self._decide(r.id, f"rolled back by the operator: the group's desired state is {r.from_version} again")
        self.db.set_rollout(r.id, status="rolled-back", reason="rolled back by the operator")
        return self.resolve(r.id)

    def _revert(self, r: Rollout, reason: str) -> None:
        self.db.set_rollout(r.id, status="aborting", reason=reason)
        self._decide(r.id, f"ABORT: {reason}")
        if r.from_version is None:
            self._set_group(r, None)
        else:
            spec = {**self._spec(r, r.from_version, None), "allow_downgrade": True}
            self._set_group(r, spec)
        for dev, d in r.devices.items():
            if d["scope"] == dev:
                self._set_scope(dev, r.name, None)  # back to the group's (old) desired state
        self._decide(
            r.id, f"rollback published: group {r.group} back to {r.from_version}; {len(r.devices)} devices had moved"
        )
        self.db.set_rollout(r.id, status="aborted", reason=reason)

    # --- desired state ---------------------------------------------------------------

    def _spec(self, r: Rollout, version: str | None, p: RolloutParams | None) -> dict[str, Any]:
        spec: dict[str, Any] = {"version": version}
        ref = self.db.bundle(r.name, version or "")
        if ref is not None:
            spec["bundle"] = ref
        if p is not None:
            spec["health"] = p.health()
        return spec

    def _models(self, scope: str) -> dict[str, Any]:
        msgs = self.db.messages([scope])
        if not msgs:
            return {}
        models = json.loads(msgs[0][2])["payload"].get("models", {})
        return models if isinstance(models, dict) else {}

    def _set_scope(self, scope: str, name: str, spec: dict[str, Any] | None) -> int:
        """Change one model's entry in a scope's desired state, keeping the other models'."""
        models = self._models(scope)
        if spec is None:
            models.pop(name, None)
        else:
            models[name] = spec
        return self.link.desired(scope, models)

    def _set_group(self, r: Rollout, spec: dict[str, Any] | None) -> int:
        return self._set_scope(f"group:{r.group}", r.name, spec)

    def _params(self, r: Rollout, **changes: Any) -> None:
        self.db.set_rollout(r.id, params=json.dumps({**r.params, **changes}))

    def _decide(self, rid: int, message: str) -> None:
        log.info("rollout %d: %s", rid, message)
        self.db.decide(rid, message)
        self.say(message)
