"""On-disk model store in the state directory: verified bundles and an atomic active pointer.

    STATE/keys/*.pub                      trusted public keys
    STATE/models/NAME/VERSION.edgepkg     verified bundles (written: temp, fsync, rename, fsync dir)
    STATE/models/NAME/active              the active version (replaced atomically the same way)

A crash at any point leaves either the old pointer or the new one, never a torn file: the
pointer is only switched after the bundle it names is fully on disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.contracts.bundle import SEMVER, Bundle, BundleError, load_public_keys, read_bundle, semver_key
from edge_runtime.contracts.durable import atomic_write, fsync_dir, read_json_file, report_corrupt
from edge_runtime.contracts.targets import host_lacks

DEFAULT_STATE_DIR = Path("/var/lib/edgert")
VERSION_TEXT = re.compile(r"^[0-9A-Za-z.+-]{1,64}$")
log = logging.getLogger(__name__)


def _journal(data: Any) -> dict[str, str | None]:
    if not isinstance(data, dict) or not isinstance(data.get("to"), str):
        raise ValueError("an update journal names the version it moves to")
    old = data.get("from")
    return {"from": old if isinstance(old, str) else None, "to": data["to"]}


def _rollbacks(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("rollbacks"), list):
        raise ValueError("expected {'rollbacks': [...]}")
    return [r for r in data["rollbacks"] if isinstance(r, dict)]


@dataclass(frozen=True)
class InstalledModel:
    name: str
    version: str
    path: Path


class ModelStore:
    """The on-disk model store: trusted keys, verified bundles, active pointers, the update journal and
    the rollback history.

    Owns every file under the state dir's keys/ and models/ and writes them crash-safely. Never
    loads a model into memory (the Runtime does) and never decides which version to run."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.keys_dir = self.root / "keys"
        self.models_dir = self.root / "models"

    def trusted_keys(self) -> list[Ed25519PublicKey]:
        return load_public_keys([self.keys_dir]) if self.keys_dir.is_dir() else []

    def trust(self, public_key: Path) -> Path:
        load_public_keys([public_key])  # refuse anything that is not an Ed25519 public key
        dest = self.keys_dir / Path(public_key).name
        atomic_write(dest, Path(public_key).read_bytes())
        return dest

    def install(
        self, bundle_path: Path, activate: bool = True, target: str | None = None, allow_downgrade: bool = False
    ) -> Bundle:
        """Verify against the trusted keys, copy into the store, and make it active. Refused: a
        bundle for another target (when ``target`` is given) and, unless ``allow_downgrade``, a
        version older than the active one (the same rules the agent applies to updates)."""
        keys = self.trusted_keys()
        if not keys:
            raise BundleError(f"no trusted keys in {self.keys_dir}; pass --trust PUB")
        bundle = read_bundle(Path(bundle_path), keys)
        m = bundle.manifest
        if target is not None and m.target != target:
            raise BundleError(f"the bundle targets {m.target}, this device is {target} (--target)")
        lacks = host_lacks(m.target)
        if lacks:
            raise BundleError(f"{m.name} {m.version} cannot run here: {lacks}")
        active = next((a.version for a in self.active() if a.name == m.name), None)
        if activate and active is not None and not allow_downgrade and semver_key(m.version) < semver_key(active):
            raise BundleError(
                f"{m.name} {m.version} is older than the active {active}; pass --allow-downgrade to go back"
            )
        dest = self.models_dir / m.name / f"{m.version}.edgepkg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(bundle_path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        if activate:
            self.activate(m.name, m.version)
        return bundle

    def activate(self, name: str, version: str) -> None:
        if not (self.models_dir / name / f"{version}.edgepkg").exists():
            raise FileNotFoundError(f"{name} {version} is not installed in {self.models_dir}")
        atomic_write(self.models_dir / name / "active", version.encode())

    # --- update journal: a kill -9 at any step leaves exactly the old or the new version ----

    def begin_update(self, name: str, old: str | None, new: str) -> None:
        atomic_write(self.models_dir / name / "pending.json", json.dumps({"from": old, "to": new}).encode())

    def end_update(self, name: str) -> None:
        (self.models_dir / name / "pending.json").unlink(missing_ok=True)
        fsync_dir(self.models_dir / name)

    def pending(self, name: str) -> dict[str, str | None] | None:
        """The update journal of a model, or None. Read, never exists-then-read: the updater may
        commit (delete it) in between. A corrupt journal is moved aside and reads as none: the
        active pointer then decides, and a version that cannot load is replaced at start."""
        return read_json_file(self.models_dir / name / "pending.json", _journal, lambda: None, "ignored")

    def recover(self) -> list[dict[str, Any]]:
        """At start: an update interrupted before its health window passed is rolled back.

        The pointer names the old version (nothing happened yet) or the new one (activated but
        never committed); either way the old version becomes active again and the journal goes.
        """
        rolled = []
        if self.models_dir.is_dir():
            for stale in self.models_dir.glob("*/.*.tmp*"):  # half-written copies of an interrupted write
                stale.unlink(missing_ok=True)
        for model in self.active():
            journal = self.pending(model.name)
            if journal is None:
                continue
            old = journal.get("from")
            if model.version == journal.get("to") and old:
                self.activate(model.name, old)
                entry = {"model": model.name, "from": journal["to"], "to": old, "ts": time.time(),
                         "reason": "the daemon stopped before the new version passed its health window"}  # fmt: skip
                self.record_rollback(entry)
                rolled.append(entry)
            self.end_update(model.name)
        return rolled

    def _history(self) -> list[dict[str, Any]]:
        return read_json_file(self.root / "history.json", _rollbacks, list, "the rollback history starts empty")

    def record_rollback(self, entry: dict[str, Any]) -> None:
        history = {"rollbacks": [*self._history()[-49:], entry]}
        try:
            atomic_write(self.root / "history.json", json.dumps(history).encode())
        except OSError as e:  # a full or read-only disk must not stop a rollback
            log.error("cannot record the rollback in %s: %s", self.root / "history.json", e)

    def last_rollback(self) -> dict[str, Any] | None:
        rollbacks = self._history()
        return rollbacks[-1] if rollbacks else None

    def prune(self, name: str, keep: set[str]) -> list[str]:
        """Remove installed versions of ``name`` not in ``keep`` (never the active one)."""
        active = next((m.version for m in self.active() if m.name == name), None)
        removed = []
        for version in self.installed_versions(name):
            if version in keep or version == active:
                continue
            try:
                self.bundle_path(name, version).unlink()
                removed.append(version)
            except OSError as e:
                log.error("cannot remove %s %s: %s", name, version, e)
        return removed

    def installed_versions(self, name: str) -> list[str]:
        """Installed versions, newest first by semantic version (unparsable names last)."""
        names = [p.stem for p in (self.models_dir / name).glob("*.edgepkg")]
        semver = [v for v in names if SEMVER.fullmatch(v)]
        return sorted(semver, key=semver_key, reverse=True) + sorted(v for v in names if v not in semver)

    def bundle_path(self, name: str, version: str) -> Path:
        return self.models_dir / name / f"{version}.edgepkg"

    def active(self) -> list[InstalledModel]:
        out: list[InstalledModel] = []
        if not self.models_dir.is_dir():
            return out
        for d in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
            version = self._pointer(d)
            if version is not None:
                out.append(InstalledModel(d.name, version, d / f"{version}.edgepkg"))
        return out

    def _pointer(self, model_dir: Path) -> str | None:
        """The active version of a model. A pointer that is garbage or names a version that is not
        installed is moved aside and the newest installed version is used (reported)."""
        pointer = model_dir / "active"
        try:
            version = pointer.read_bytes().decode().strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            version, reason = "", f"unreadable: {e}"
        else:
            reason = f"names {version[:40]!r}, which is not installed"
        if version and VERSION_TEXT.match(version) and (model_dir / f"{version}.edgepkg").exists():
            return version
        installed = self.installed_versions(model_dir.name)
        fallback = installed[0] if installed else None
        report_corrupt(pointer, f"active pointer {reason}", f"using {fallback or 'nothing'} (newest installed)")
        if fallback is not None:
            try:
                atomic_write(pointer, fallback.encode())
            except OSError as e:
                log.error("cannot rewrite %s: %s", pointer, e)
        return fallback
