"""On-disk model store in the state directory: verified bundles and an atomic active pointer.

    STATE/keys/*.pub                      trusted public keys
    STATE/models/NAME/VERSION.edgepkg     verified bundles (written: temp, fsync, rename, fsync dir)
    STATE/models/NAME/active              the active version (replaced atomically the same way)

A crash at any point leaves either the old pointer or the new one, never a torn file: the
pointer is only switched after the bundle it names is fully on disk.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.bundle import Bundle, BundleError, load_public_keys, read_bundle

DEFAULT_STATE_DIR = Path("/var/lib/edgert")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class InstalledModel:
    name: str
    version: str
    path: Path


class ModelStore:
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
