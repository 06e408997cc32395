"""On-disk model store in the state directory: verified bundles and an atomic active pointer.

    STATE/keys/*.pub                      trusted public keys
    STATE/models/NAME/VERSION.edgepkg     verified bundles (written: temp, fsync, rename, fsync dir)
    STATE/models/NAME/active              the active version (replaced atomically the same way)

A crash at any point leaves either the old pointer or the new one, never a torn file: the
pointer is only switched after the bundle it names is fully on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.contracts.bundle import Bundle, BundleError, load_public_keys, read_bundle
from edge_runtime.contracts.durable import atomic_write, fsync_dir

DEFAULT_STATE_DIR = Path("/var/lib/edgert")


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

    def install(self, bundle_path: Path, activate: bool = True) -> Bundle:
        """Verify against the trusted keys, copy into the store, and make it active."""
        keys = self.trusted_keys()
        if not keys:
            raise BundleError(f"no trusted keys in {self.keys_dir}; pass --trust PUB")
        bundle = read_bundle(Path(bundle_path), keys)
        m = bundle.manifest
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
        try:  # read, not exists-then-read: the updater may commit (delete it) in between
            data: dict[str, str | None] = json.loads((self.models_dir / name / "pending.json").read_text())
        except FileNotFoundError:
            return None
        return data

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

    def record_rollback(self, entry: dict[str, Any]) -> None:
        path = self.root / "history.json"
        history = json.loads(path.read_text()) if path.exists() else {"rollbacks": []}
        history["rollbacks"] = [*history["rollbacks"][-49:], entry]
        atomic_write(path, json.dumps(history).encode())

    def last_rollback(self) -> dict[str, Any] | None:
        path = self.root / "history.json"
        rollbacks = json.loads(path.read_text())["rollbacks"] if path.exists() else []
        return rollbacks[-1] if rollbacks else None

    def installed_versions(self, name: str) -> list[str]:
        return sorted(p.stem for p in (self.models_dir / name).glob("*.edgepkg"))

    def bundle_path(self, name: str, version: str) -> Path:
        return self.models_dir / name / f"{version}.edgepkg"

    def active(self) -> list[InstalledModel]:
        out: list[InstalledModel] = []
        if not self.models_dir.is_dir():
            return out
        for d in sorted(p for p in self.models_dir.iterdir() if p.is_dir()):
            pointer = d / "active"
            if pointer.exists():
                version = pointer.read_text().strip()
                out.append(InstalledModel(d.name, version, d / f"{version}.edgepkg"))
        return out
