"""Convergence: from the accepted desired state to what the device serves.

For each model the device's own desired state wins over its group's. The converger asks the
updater to move the served version (download, verify, stage, activate, health window), loads a
blue-green standby beside it, and starts or ends shadow/A-B experiments. What failed is
remembered by (model, version, bundle sha256) and not retried until the controller signs a new
desired state; versions that were in their health window when the daemon died are not retried
either.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge_runtime.contracts.fleet import (
    BundleRef,
    DesiredState,
    ExperimentSpec,
    HealthPolicy,
    ModelSpec,
    StandbySpec,
    UpdateOutcome,
    VerdictKind,
)
from edge_runtime.device.agent.downloads import DownloadInterrupted, Downloads, DownloadSuperseded, UpdateRefused
from edge_runtime.device.agent.health_window import Verdict
from edge_runtime.device.agent.records import AgentRecords
from edge_runtime.device.agent.updater import Updater, crash_point
from edge_runtime.serving.runtime import Runtime
from edge_runtime.serving.store import ModelStore

log = logging.getLogger(__name__)

RefusalKey = tuple[str, str, str]
Events = Callable[[str, dict[str, Any]], None]


def refusal_key(name: str, version: str | None, ref: BundleRef | None) -> RefusalKey:
    """What a refusal is remembered by: a new bundle of the same version may be tried again."""
    return (name, version or "", ref.sha256 if ref is not None else "")


class Converger:
    """Owns the accepted desired state per scope and the memory of what failed. Never reads MQTT
    or checks signatures (the session does), never writes the store itself (the updater does)."""

    def __init__(
        self,
        device_id: str,
        group: str,
        runtime: Runtime,
        store: ModelStore,
        updater: Updater,
        downloads: Downloads,
        records: AgentRecords,
        events: Events,
        publish_state: Callable[[], None],
        seqs: Callable[[], dict[str, int]],
        crashed: set[tuple[str, str]],
    ) -> None:
        self.device_id, self.group = device_id, group
        self.runtime, self.store, self.updater, self.downloads = runtime, store, updater, downloads
        self.records, self.event, self.publish_state, self.seqs = records, events, publish_state, seqs
        self._lock = threading.Lock()
        self.desired: dict[str, dict[str, ModelSpec]] = {}  # scope -> models
        self.rejected: set[RefusalKey] = set()
        self.crashed = crashed
        self._retry: dict[RefusalKey, tuple[float, float]] = {}  # key -> (not before, backoff s)
        self._wanted_shas: set[str] = set()

    # --- accepted desired state ------------------------------------------------------

    def knows(self, scope: str) -> bool:
        with self._lock:
            return scope in self.desired

    def accept(self, state: DesiredState, new: bool) -> None:
        """Take a verified desired state; ``new``: a newer seq than before (a retry of what failed
        is allowed again), else the same state seen again after a restart."""
        with self._lock:
            if new:
                self.rejected.clear()
                self.crashed.clear()
            self.desired[state.scope] = dict(state.models)

    def wanted(self) -> dict[str, ModelSpec]:
        with self._lock:
            merged = dict(self.desired.get(f"group:{self.group}", {}))
            merged.update(self.desired.get(self.device_id, {}))  # the device's own desired state wins
            return merged

    # --- one pass --------------------------------------------------------------------

    def converge_all(self, stopping: Callable[[], bool]) -> None:
        active = {m.name: m.version for m in self.store.active()}
        wanted = self.wanted()
        refs = [r for s in wanted.values() for r in (s.bundle, s.standby and s.standby.bundle,
                                                     s.experiment and s.experiment.bundle) if r]  # fmt: skip
        shas = {r.sha256 for r in refs}
        for sha in self._wanted_shas - shas:  # replaced by a newer desired state: gone at once
            self.downloads.discard(sha)
        self._wanted_shas = shas
        self.downloads.clean(keep=shas)  # leftovers of older runs, after a grace period
        for name, spec in wanted.items():
            if stopping():
                return
            try:
                self._converge(name, spec, active.get(name), stopping)
                self._converge_extras(name, spec)
            except Exception as e:  # never let one bad desired entry stop the agent
                log.exception("update of %s failed", name)
                self.event("update-error", {"model": name, "error": str(e)[:300]})

    def _converge(self, name: str, spec: ModelSpec, active: str | None, stopping: Callable[[], bool]) -> None:
        version = spec.version
        if not version or version == active:
            return
        key = refusal_key(name, version, spec.bundle)
        if key in self.rejected or (name, version) in self.crashed:
            return
        if time.monotonic() < self._retry.get(key, (0.0, 0.0))[0]:
            return  # a transient download failure: backing off
        try:
            path = self._installed_or_obtain(name, version, spec.bundle, lambda: self.wanted().get(name) is not spec)
            if path is None:
                return  # chunks still arriving; the session wakes us when the last one lands
            self.updater.stage(name, version, path, spec.allow_downgrade)
            self._retry.pop(key, None)
            if path.parent == self.downloads.root:
                path.unlink(missing_ok=True)  # the store holds it now
        except DownloadSuperseded:
            if spec.bundle is not None:
                self.downloads.discard(spec.bundle.sha256)  # its partial file goes with it
            return  # a newer desired state came in: the next pass follows it
        except DownloadInterrupted as e:  # never a refusal: resumed (HTTP Range) after a back-off
            delay = min(300.0, max(2.0, self._retry.get(key, (0.0, 1.0))[1] * 2))
            self._retry[key] = (time.monotonic() + delay, delay)
            log.warning("download of %s %s interrupted (%s); resuming in %.0f s", name, version, e, delay)
            self.event("download-interrupted", {"model": name, "version": version, "reason": str(e)[:300],
                                                "retry_in_s": delay})  # fmt: skip
            return
        except UpdateRefused as e:
            self.rejected.add(key)
            log.error("update to %s %s refused: %s", name, version, e)
            self.event("update-refused", {"model": name, "version": version, "reason": str(e)})
            self.records.record_outcome(name, version, UpdateOutcome.REFUSED, str(e), self.seqs())
            self.publish_state()
            return
        self.event("update-started", {"model": name, "from": active, "to": version})
        self.publish_state()
        standby = spec.standby
        keep_old = standby is not None and standby.version == active  # blue-green: old stays warm
        result = self.updater.activate_and_watch(
            name,
            version,
            spec.health or HealthPolicy(),
            stop=stopping,
            keep_old=keep_old,
            on_serving=self.publish_state,
        )
        if result.verdict is VerdictKind.STOPPED:  # not a verdict: tried again after the restart
            self.event("update-interrupted", {"model": name, "from": active, "to": version})
            return
        if result.outcome is not UpdateOutcome.COMMITTED:
            self.rejected.add(key)
        window = Verdict(result.outcome is UpdateOutcome.COMMITTED, result.reason, result.figures).window_figures()
        outcome = {"model": name, "from": active, "to": version, "reason": result.reason}
        self.event(f"update-{result.outcome.value}", {**outcome, "figures": window.model_dump()})
        self.records.record_outcome(name, version, result.outcome, result.reason, self.seqs(), window, result.verdict)
        if result.outcome is UpdateOutcome.COMMITTED:
            self._prune(name, spec, previous=active)
        self.publish_state()

    def _prune(self, name: str, spec: ModelSpec, previous: str | None) -> None:
        """Disk budget: keep the active version, the one before it (instant local rollback), a
        blue-green standby and an experiment's variant; remove the rest."""
        keep = {v for v in (spec.version, previous) if v}
        keep |= {x.version for x in (spec.standby, spec.experiment) if x is not None}
        removed = self.store.prune(name, keep)
        if removed:
            self.event("bundles-pruned", {"model": name, "removed": removed})

    def _installed_or_obtain(
        self, name: str, version: str, ref: BundleRef | None, cancelled: Callable[[], bool] = lambda: False
    ) -> Path | None:
        """A version still in the store (the one before an update, a blue-green standby) needs no
        download: switching back to it is local. It is verified again all the same."""
        installed = self.store.bundle_path(name, version)
        if ref is None:
            if installed.exists():
                return installed  # a rollback to a version the controller never published: it is here
            raise UpdateRefused(f"{name} {version} is not installed and the desired state names no bundle")
        if installed.exists() and hashlib.sha256(installed.read_bytes()).hexdigest() == ref.sha256:
            return installed
        return self.downloads.obtain(ref, crash_point, cancelled)

    # --- standby and experiments -----------------------------------------------------

    def _converge_extras(self, name: str, spec: ModelSpec) -> None:
        """Blue-green standby and shadow/A-B experiments beside the served version."""
        try:
            handle = self.runtime.get(name)
        except KeyError:
            return  # nothing served yet: extras wait for the main version
        standby = spec.standby
        if standby is not None and standby.version != handle.current.version:
            if handle.standby is None or handle.standby.version != standby.version:
                path = self._extra_bundle(name, standby, "standby")
                if path is not None:
                    self.runtime.prepare(path)
                    self.event("standby-ready", {"model": name, "version": standby.version})
                    self.publish_state()
        elif handle.standby is not None and standby is None:
            self.runtime.release_standby(name)
            self.publish_state()
        exp = spec.experiment
        current = handle.experiment
        if exp is not None:
            split = exp.split if exp.kind == "ab" else 0.0
            same = current is not None and (current.kind, current.version, current.served, current.split) == (
                exp.kind.value, exp.version, handle.current.version, split)  # fmt: skip
            if not same:
                path = self._extra_bundle(name, exp, f"experiment-{exp.kind.value}")
                if path is not None:
                    ended = self.runtime.stop_experiment(name)
                    if ended is not None:
                        self.event("experiment-ended", {"model": name, "figures": ended.model_dump(mode="json")})
                    self.runtime.start_experiment(path, exp.kind.value, split)
                    self.event("experiment-started", {"model": name, "kind": exp.kind.value, "version": exp.version})
                    self.publish_state()
        elif current is not None:
            ended = self.runtime.stop_experiment(name)
            self.event("experiment-ended", {"model": name, "figures": ended.model_dump(mode="json") if ended else None})
            self.publish_state()

    def _extra_bundle(self, name: str, spec: StandbySpec | ExperimentSpec, what: str) -> Path | None:
        key = refusal_key(name, spec.version, spec.bundle)
        if key in self.rejected:
            return None
        try:
            path = self._installed_or_obtain(name, spec.version, spec.bundle)
            if path is not None:
                # Not activated, so no version order to keep; activating it later is checked then.
                self.updater.stage(name, spec.version, path, downgrade=True)
                return self.store.bundle_path(name, spec.version)
        except (UpdateRefused, ValueError) as e:
            self._refuse_extra(name, spec, what, str(e))
        return None

    def _refuse_extra(self, name: str, spec: StandbySpec | ExperimentSpec, what: str, reason: str) -> None:
        """Refused once and remembered: not retried until the controller signs a new desired state."""
        key = refusal_key(name, spec.version, spec.bundle)
        if key in self.rejected:
            return
        self.rejected.add(key)
        log.error("%s %s %s refused: %s", what, name, spec.version, reason)
        self.event(f"{what}-refused", {"model": name, "version": spec.version, "reason": reason[:300]})
        self.records.record_outcome(name, spec.version, UpdateOutcome(f"{what}-refused"), reason, self.seqs())
        self.publish_state()
