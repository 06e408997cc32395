"""Model updates on the device: fetch, verify, stage, activate, watch, commit or roll back.

Steps, each safe against kill -9 (the store's journal and atomic pointer make the restart
land on exactly the old or exactly the new version):

    download  MQTT chunks (each hashed, kept on disk: resumable) or a URL (http(s)/file)
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
import hashlib
import logging
import os
import shutil
import signal
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.contracts.bundle import BundleError, read_bundle, semver_key
from edge_runtime.serving.health import HealthPolicy, Verdict, evaluate
from edge_runtime.serving.runtime import Runtime
from edge_runtime.serving.store import ModelStore, atomic_write, fsync_dir

log = logging.getLogger(__name__)

MAX_BUNDLE_BYTES = 1 << 30
STEPS = ("download", "verify", "write", "rename", "activate", "health")


class UpdateRefused(Exception):
    """The update was refused before the active model was touched."""


def crash_point(step: str) -> None:
    """Fault injection for the kill -9 tests: EDGERT_FAULT_KILL_AT=<step> kills this process
    for real (SIGKILL, no cleanup) at that step. The fault is real; only its timing is chosen."""
    if os.environ.get("EDGERT_FAULT_KILL_AT") == step:
        log.error("fault injection: SIGKILL at %s", step)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class BundleRef:
    sha256: str
    size: int
    chunk_size: int = 0
    chunks: list[str] = field(default_factory=list)
    url: str | None = None
    topic: str | None = None

    @classmethod
    def parse(cls, d: dict[str, Any]) -> BundleRef:
        try:
            chunks = [str(c) for c in d.get("chunks", [])]
            ref = cls(
                str(d["sha256"]), int(d["size"]), int(d.get("chunk_size", 0)), chunks, d.get("url"), d.get("topic")
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UpdateRefused(f"bundle reference is malformed: {e}") from e
        if len(ref.sha256) != 64 or not 0 < ref.size <= MAX_BUNDLE_BYTES:
            raise UpdateRefused(f"bundle reference has a bad sha256 or size ({ref.size})")
        if not ref.url and not (ref.chunks and ref.chunk_size > 0):
            raise UpdateRefused("bundle reference names neither a URL nor MQTT chunks")
        if ref.chunks and (len(ref.chunks) - 1) * ref.chunk_size >= ref.size:
            raise UpdateRefused("chunk list does not match the bundle size")
        return ref


class ChunkStore:
    """Chunks of one bundle on disk, each verified against its hash: a transfer resumes after a
    disconnect or a restart with what it already has."""

    def __init__(self, root: Path, ref: BundleRef) -> None:
        self.ref = ref
        self.dir = root / ref.sha256
        self.dir.mkdir(parents=True, exist_ok=True)

    def have(self, index: int) -> bool:
        return (self.dir / f"{index}.chunk").exists()

    def missing(self) -> list[int]:
        return [i for i in range(len(self.ref.chunks)) if not self.have(i)]

    def put(self, index: int, data: bytes) -> bool:
        if not 0 <= index < len(self.ref.chunks):
            return False
        if hashlib.sha256(data).hexdigest() != self.ref.chunks[index]:
            log.warning("chunk %d of %s has a wrong hash; dropped", index, self.ref.sha256[:12])
            return False
        if not self.have(index):
            atomic_write(self.dir / f"{index}.chunk", data)
        return True

    def assemble(self, dest: Path) -> Path:
        tmp = dest.with_name(dest.name + ".tmp")
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for i in range(len(self.ref.chunks)):
                data = (self.dir / f"{i}.chunk").read_bytes()
                h.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != self.ref.sha256 or tmp.stat().st_size != self.ref.size:
            tmp.unlink()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise UpdateRefused("assembled bundle does not match its whole-file sha256/size")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        shutil.rmtree(self.dir, ignore_errors=True)
        return dest


def fetch_url(ref: BundleRef, dest: Path, timeout: float = 60.0) -> Path:
    if not ref.url or not ref.url.startswith(("http://", "https://", "file://")):
        raise UpdateRefused(f"bundle URL {ref.url!r} must be http(s):// or file://")
    tmp = dest.with_name(dest.name + ".tmp")
    h, n = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(ref.url, timeout=timeout) as r, open(tmp, "wb") as out:
            while chunk := r.read(1 << 20):
                n += len(chunk)
                if n > ref.size:
                    raise UpdateRefused(f"{ref.url} is larger than the {ref.size} bytes announced")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UpdateRefused(f"cannot fetch {ref.url}: {e}") from e
    if n != ref.size or h.hexdigest() != ref.sha256:
        tmp.unlink(missing_ok=True)
        raise UpdateRefused(f"{ref.url}: {n} bytes, sha256 {h.hexdigest()[:12]}: does not match the signed reference")
    os.replace(tmp, dest)
    return dest


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
    if active is not None and semver_key(version) <= semver_key(active) and not downgrade:
        raise UpdateRefused(
            f"version {version} is not newer than the active {active} (a downgrade must be signed as one)"
        )


@dataclass
class UpdateResult:
    model: str
    version: str
    outcome: str  # committed | rolled-back | refused
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


class Updater:
    def __init__(self, store: ModelStore, runtime: Runtime, keys: Callable[[], list[Ed25519PublicKey]], target: str):
        self.store, self.runtime, self.keys, self.target = store, runtime, keys, target
        self.downloads = store.root / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)

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
    ) -> UpdateResult:
        current = next((m.version for m in self.store.active() if m.name == name), None)
        self.store.begin_update(name, current, version)
        crash_point("activate")
        self.store.activate(name, version)
        try:
            if current is None:
                self.runtime.load(self.store.bundle_path(name, version))
            else:
                self.runtime.swap(self.store.bundle_path(name, version), keep_old=keep_old)
        except Exception as e:  # crash on load (or warm-up): never served
            return self._roll_back(name, current, version, f"new version failed to load: {e}", {})
        handle = self.runtime.get(name)
        baseline = handle.previous.stats if handle.previous is not None else None
        crash_point("health")
        verdict = self._window(policy, baseline, handle.current.stats, stop)
        if not verdict.healthy:
            return self._roll_back(name, current, version, verdict.reason, verdict.figures)
        self.store.end_update(name)
        return UpdateResult(name, version, "committed", verdict.reason, verdict.figures)

    def _window(self, policy: HealthPolicy, baseline: Any, stats: Any, stop: Callable[[], bool]) -> Verdict:
        start = time.monotonic()
        hard_stop = start + 3 * policy.window_s
        while True:
            time.sleep(0.1)
            elapsed = time.monotonic() - start
            verdict = evaluate(policy, baseline, stats)
            # Outright failures (errors, NaN/Inf) end the window early; latency and drift are
            # judged only at its end, on enough samples (they are noisy on a handful).
            if not verdict.healthy and verdict.kind == "errors" and stats.rows >= max(5, policy.min_inferences // 4):
                return verdict
            if (elapsed >= policy.window_s and stats.rows >= policy.min_inferences) or time.monotonic() > hard_stop:
                return verdict
            if stop():
                return Verdict(False, "the daemon is stopping during the health window", {})

    def _roll_back(self, name: str, old: str | None, new: str, reason: str, figures: dict[str, Any]) -> UpdateResult:
        log.error("rolling back %s %s -> %s: %s", name, new, old, reason)
        if old is not None:
            self.store.activate(name, old)
            try:
                if self.runtime.get(name).current.version != old:
                    self.runtime.swap(self.store.bundle_path(name, old))  # instant when old is the standby
            except Exception as e:  # the old version loaded before: this should not fail
                log.exception("could not swap back to %s %s: %s", name, old, e)
        else:
            with contextlib.suppress(KeyError):
                self.runtime.unload(name)
        self.store.end_update(name)
        entry = {"model": name, "from": new, "to": old, "reason": reason, "ts": time.time()}
        self.store.record_rollback(entry)
        return UpdateResult(name, new, "rolled-back", reason, figures)
