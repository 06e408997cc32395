"""Model updates on the device: fetch, verify, stage, activate, watch, commit or roll back.

Steps, each safe against kill -9 (the store's journal and atomic pointer make the restart
land on exactly the old or exactly the new version):

    download  MQTT chunks (each hashed, kept on disk: resumable) or a URL (downloads.py)
    verify    signature against the trusted keys, every hash and size, name, version,
              target, and version monotonicity (lower only via an explicitly signed rollback)
    write     into the store's inactive slot: temp, fsync, rename, fsync dir
    activate  journal, then the atomic pointer switch, then the Runtime's hot swap
    health    the window: errors and NaN/Inf, p95 latency and output drift against the old
              version, crash on load or on first inference
    commit    journal removed | roll back: old pointer, hot swap back, reason reported
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.contracts.bundle import BundleError, read_bundle, semver_key
from edge_runtime.contracts.durable import fsync_dir
from edge_runtime.contracts.fleet import HealthPolicy, UpdateOutcome, VerdictKind
from edge_runtime.contracts.targets import host_lacks
from edge_runtime.device.agent.downloads import UpdateRefused
from edge_runtime.device.agent.health_window import Verdict, evaluate
from edge_runtime.device.agent.latency_pairs import LatencyPairs
from edge_runtime.serving.runtime import Runtime
from edge_runtime.serving.stats import VersionStats
from edge_runtime.serving.store import ModelStore

log = logging.getLogger(__name__)

STEPS = ("download", "verify", "write", "rename", "activate", "health")


def crash_point(step: str) -> None:
    """Fault injection for the kill -9 tests: EDGERT_FAULT_KILL_AT=<step> kills this process
    for real (SIGKILL, no cleanup) at that step. The fault is real; only its timing is chosen."""
    if os.environ.get("EDGERT_FAULT_KILL_AT") == step:
        log.error("fault injection: SIGKILL at %s", step)
        os.kill(os.getpid(), signal.SIGKILL)


def verify_candidate(
    path: Path, keys: list[Ed25519PublicKey], name: str, version: str, target: str, active: str | None, downgrade: bool
) -> None:
    try:
        m = read_bundle(path, keys, check_external_data=False).manifest
    except BundleError as e:
        raise UpdateRefused(f"bundle refused: {e}") from e
    if m.name != name or m.version != version:
        raise UpdateRefused(f"bundle is {m.name} {m.version}, desired state says {name} {version}")
    if m.target != target:
        raise UpdateRefused(f"bundle targets {m.target}, this device is {target}")
    lacks = host_lacks(m.target)
    if lacks:
        raise UpdateRefused(f"bundle cannot run here: {lacks}")
    if active is not None and semver_key(version) <= semver_key(active) and not downgrade:
        raise UpdateRefused(
            f"version {version} is not newer than the active {active} (a downgrade must be signed as one)"
        )


@dataclass
class UpdateResult:
    model: str
    version: str
    outcome: UpdateOutcome
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    verdict: VerdictKind | None = None


class Updater:
    """Moves one model between versions: stage a verified bundle into the store, activate it,
    watch the health window, commit or roll back.

    It is the one place that makes the store's active pointer and the runtime's loaded version
    agree (``align``): the daemon's SIGHUP reload and the rollback path both go through it. It
    never downloads (downloads.py) and never reads MQTT (the agent's session does).
    """

    def __init__(self, store: ModelStore, runtime: Runtime, keys: Callable[[], list[Ed25519PublicKey]], target: str):
        self.store, self.runtime, self.keys, self.target = store, runtime, keys, target
        self.downloads = store.root / "downloads"
        # created on first use (Downloads): a read-only state dir must not stop the daemon here

    def stage(self, name: str, version: str, bundle_file: Path, downgrade: bool) -> None:
        crash_point("verify")
        active = next((m.version for m in self.store.active() if m.name == name), None)
        verify_candidate(bundle_file, self.keys(), name, version, self.target, active, downgrade)
        crash_point("write")
        dest = self.store.bundle_path(name, version)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copyfile(bundle_file, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            crash_point("rename")
            os.replace(tmp, dest)
            fsync_dir(dest.parent)

    def activate_and_watch(
        self,
        name: str,
        version: str,
        policy: HealthPolicy,
        stop: Callable[[], bool] = lambda: False,
        keep_old: bool = False,
        on_serving: Callable[[], None] = lambda: None,
    ) -> UpdateResult:
        """Activate ``version`` and judge it through the health window; ``on_serving`` is called
        once the new version serves (the agent publishes its state then, not a period later)."""
        current = next((m.version for m in self.store.active() if m.name == name), None)
        self.store.begin_update(name, current, version)
        crash_point("activate")
        self.store.activate(name, version)
        try:
            if current is None:
                self.runtime.load(self.store.bundle_path(name, version))
            else:
                # The old version stays warm through the window: paired latency needs it, and a
                # rollback then is an instant switch back.
                self.runtime.swap(self.store.bundle_path(name, version), keep_old=True)
        except Exception as e:  # crash on load (or warm-up): never served
            return self._roll_back(name, current, version, f"new version failed to load: {e}", {}, VerdictKind.LOAD)
        on_serving()
        handle = self.runtime.get(name)
        baseline = handle.previous.stats if handle.previous is not None else None
        pairs = LatencyPairs(handle.current, handle.standby) if current is not None and handle.standby else None
        handle.on_served = pairs.offer if pairs is not None else None
        crash_point("health")
        try:
            verdict = self._window(policy, baseline, handle.current.stats, stop, pairs)
        finally:
            handle.on_served = None
            if pairs is not None:
                pairs.close()
        if verdict.healthy and not keep_old and current is not None:
            self.runtime.release_standby(name)  # committed: the old version is freed (unless blue-green)
        if verdict.kind is VerdictKind.STOPPED:
            return self._interrupt(name, current, version)
        if not verdict.healthy:
            return self._roll_back(name, current, version, verdict.reason, verdict.figures, verdict.kind)
        self.store.end_update(name)
        return UpdateResult(name, version, UpdateOutcome.COMMITTED, verdict.reason, verdict.figures, verdict.kind)

    def _window(
        self,
        policy: HealthPolicy,
        baseline: VersionStats | None,
        stats: VersionStats,
        stop: Callable[[], bool],
        pairs: LatencyPairs | None = None,
    ) -> Verdict:
        start = time.monotonic()
        hard_stop = start + 3 * policy.window_s
        while True:
            time.sleep(0.1)
            elapsed = time.monotonic() - start
            paired = pairs.verdict(policy.max_p95_ratio, policy.min_p95_increase_ms) if pairs is not None else None
            verdict = evaluate(policy, baseline, stats, paired)
            # Outright failures (errors, NaN/Inf) end the window early; latency and drift are
            # judged only at its end, on enough samples (they are noisy on a handful).
            if (
                not verdict.healthy
                and verdict.kind is VerdictKind.ERRORS
                and stats.rows >= max(5, policy.min_inferences // 4)
            ):
                return verdict
            if elapsed >= policy.window_s and stats.rows >= policy.min_inferences:
                return verdict
            if time.monotonic() > hard_stop:
                if stats.rows >= policy.min_inferences and stats.rows:
                    return verdict
                # Too little traffic to judge: nothing bad was seen, so the version stays, but the
                # fleet is told it is unjudged (a canary on idle devices proves nothing).
                n = stats.rows
                why = f"unjudged: {n} inferences in {elapsed:.0f} s (the window needs {policy.min_inferences})"
                return Verdict(True, why, verdict.figures, VerdictKind.IDLE)
            if stop():
                return Verdict(False, "the daemon is stopping during the health window", {}, VerdictKind.STOPPED)

    def align(self, name: str | None = None) -> list[str]:
        """Make the runtime serve what the store's active pointers name (load a new model,
        hot-swap a changed version). Returns what changed; a version that cannot load is
        reported and the serving one kept."""
        loaded = {h.name: h.current.version for h in self.runtime.models()}
        changed = []
        for model in self.store.active():
            if name is not None and model.name != name:
                continue
            try:
                if model.name not in loaded:
                    self.runtime.load(model.path)
                elif loaded[model.name] != model.version:
                    self.runtime.swap(model.path)  # instant when that version is the warm standby
                else:
                    continue
                changed.append(f"{model.name} {model.version}")
            except Exception as e:  # a bad version must never take the serving one down
                log.error("cannot serve %s %s: %s", model.name, model.version, e)
        return changed

    def _interrupt(self, name: str, old: str | None, new: str) -> UpdateResult:
        """The daemon is stopping (SIGTERM) during the window: nothing was judged, so nothing is
        held against the new version. The pointer goes back to the old version (the state a
        restart must find consistent) without recording a rollback, and after the restart the
        agent converges on the desired state again: the window is run anew. A fleet rollback
        interrupted this way still ends on its desired version."""
        log.warning("health window of %s %s interrupted by shutdown; it resumes after the restart", name, new)
        if old is not None:
            self.store.activate(name, old)
        self.store.end_update(name)
        return UpdateResult(name, new, UpdateOutcome.ROLLED_BACK, "interrupted by shutdown", {}, VerdictKind.STOPPED)

    def _roll_back(
        self,
        name: str,
        old: str | None,
        new: str,
        reason: str,
        figures: dict[str, Any],
        kind: VerdictKind | None = None,
    ) -> UpdateResult:
        log.error("rolling back %s %s -> %s: %s", name, new, old, reason)
        if old is not None:
            self.store.activate(name, old)
            self.align(name)
        else:
            with contextlib.suppress(KeyError):
                self.runtime.unload(name)
        self.store.end_update(name)
        entry = {"model": name, "from": new, "to": old, "reason": reason, "ts": time.time()}
        self.store.record_rollback(entry)
        return UpdateResult(name, new, UpdateOutcome.ROLLED_BACK, reason, figures, kind)
