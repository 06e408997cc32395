"""Device image: a tarball laid out like the target root file system, and its installer.

    usr/bin/edgert                              the one-file binary, or a wrapper that execs the folder's:
    usr/lib/edgert/edgert, usr/lib/edgert/_internal/...   the one-folder binary (nothing to unpack at
                                                start: ready in under a second instead of 2-3 s)
    etc/systemd/system/edgert.service           the unit (systemd/edgert.service)
    usr/lib/sysusers.d/edgert.conf              the unprivileged `edgert` user, in group video
    etc/edgert/edgert.yaml                      default config (a conffile: kept when changed)
    etc/edgert/keys/*.pub                       trusted bundle signing keys
    usr/share/edgert/bundles/*.edgepkg          initial bundles, seeded into the state dir
    usr/share/edgert/IMAGE.json                 what the image holds, with hashes, and its CPU (arch)

An image is for one CPU (x86_64 or aarch64), read from the binary's ELF header or given with
--arch: a binary of the other CPU, or a bundle whose target runs on another CPU, is refused when
the image is built, and an image is refused by a root whose libraries are of another CPU.

Installing into a root directory (for flashing into an image, or an upgrade in place) is
idempotent, writes each file atomically, keeps a locally changed config (the new one lands
beside it as .new), and never touches the state directory beyond seeding a model that has no
active version yet: an upgrade keeps installed models, the outbox and everything else there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime import __version__
from edge_runtime.contracts.bundle import BundleError, load_public_keys, read_bundle
from edge_runtime.contracts.durable import atomic_write
from edge_runtime.contracts.targets import elf_arch, normalize_arch, target_archs
from edge_runtime.serving.store import ModelStore

REPO = Path(__file__).resolve().parents[2]
DEFAULT_UNIT = REPO / "systemd" / "edgert.service"
SYSUSERS = 'u edgert - "edge-runtime daemon" /var/lib/edgert\nm edgert video\n'
DEFAULT_CONFIG = """\
# edgert serve configuration; every key is documented in the README. Unknown keys are errors.
state_dir: /var/lib/edgert
host: 127.0.0.1
port: 8000
uds: /run/edgert/edgert.sock
trust_dirs: [/etc/edgert/keys]
batching:
  max_batch: 8
  max_delay_ms: 0
"""
CONFFILES = ("etc/edgert/edgert.yaml",)
MODES = {"usr/bin/edgert": 0o755}
MAX_MEMBER = 1 << 30
LIB = "usr/lib/edgert/"
# exec keeps the PID: systemd's Type=notify and the watchdog see the daemon itself.
WRAPPER = (
    b'#!/bin/sh\n# edge-runtime: the one-folder binary lives in /usr/lib/edgert\nexec /usr/lib/edgert/edgert "$@"\n'
)


class ImageError(Exception):
    pass


def build_image(
    out: Path,
    binary: Path,
    bundles: list[Path],
    trust: list[Path],
    unit: Path = DEFAULT_UNIT,
    config: str = DEFAULT_CONFIG,
    arch: str | None = None,
) -> dict[str, str]:
    """Write the image tarball; every bundle is verified against the trusted keys first, and the
    binary and every bundle must be for the image's CPU."""
    keys = load_public_keys(trust)
    arch = _image_arch(Path(binary), arch)
    files, modes = _binary_files(Path(binary))
    files |= {
        "etc/systemd/system/edgert.service": Path(unit).read_bytes(),
        "usr/lib/sysusers.d/edgert.conf": SYSUSERS.encode(),
        "etc/edgert/edgert.yaml": config.encode(),
    }
    for key in trust:
        for pub in sorted(Path(key).glob("*.pub")) if Path(key).is_dir() else [Path(key)]:
            files[f"etc/edgert/keys/{pub.name}"] = pub.read_bytes()
    for b in bundles:
        try:
            m = read_bundle(Path(b), keys).manifest
        except BundleError as e:
            raise ImageError(f"bundle {b} refused: {e}") from e
        runs_on = target_archs(m.target)
        if arch and runs_on and arch not in runs_on:
            raise ImageError(
                f"bundle {b} targets {m.target} ({' or '.join(runs_on)} devices); this image is for {arch}"
            )
        files[f"usr/share/edgert/bundles/{m.name}-{m.version}.edgepkg"] = Path(b).read_bytes()
    index = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    meta = {"edgert": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": index,
            "modes": modes, "arch": arch}  # fmt: skip
    files["usr/share/edgert/IMAGE.json"] = json.dumps(meta, indent=2).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with tarfile.open(tmp, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), modes.get(name, 0o644), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return index


def _image_arch(binary: Path, asked: str | None) -> str | None:
    """The image's CPU: the binary's (ELF header), which --arch must agree with when given."""
    exe = binary / "edgert" if binary.is_dir() else binary
    found = elf_arch(exe)
    try:
        want = normalize_arch(asked) if asked else None
    except ValueError as e:
        raise ImageError(f"--arch: {e}") from e
    if want and found and want != found:
        raise ImageError(f"--arch {asked}, but the binary {exe} is an {found} executable (build it with "
                         f"packaging/build-binary.sh --arch {asked})")  # fmt: skip
    return want or found


def _root_arch(root: Path) -> str | None:
    """The CPU of a Debian-style root file system, from its multiarch library folder; None if unknown."""
    found = {a for a, d in (("x86_64", "x86_64-linux-gnu"), ("aarch64", "aarch64-linux-gnu"))
             if (root / "usr/lib" / d).is_dir()}  # fmt: skip
    return found.pop() if len(found) == 1 else None


def _binary_files(binary: Path) -> tuple[dict[str, bytes], dict[str, int]]:
    """The binary's members and their modes: a one-file binary at usr/bin/edgert, or a one-folder
    build (dist/edgert-dir) under usr/lib/edgert with a wrapper at usr/bin/edgert. Links inside
    the folder are stored as the files they point to (an image holds regular files only)."""
    if not binary.is_dir():
        return {"usr/bin/edgert": binary.read_bytes()}, dict(MODES)
    if not (binary / "edgert").is_file():
        raise ImageError(f"{binary} is a folder without an 'edgert' executable (expected dist/edgert-dir)")
    files = {"usr/bin/edgert": WRAPPER}
    modes = dict(MODES)
    for path in sorted(binary.rglob("*")):
        if path.is_dir():
            continue
        rel = path.relative_to(binary).as_posix()
        target = path.resolve()
        if not target.is_relative_to(binary.resolve()):
            raise ImageError(f"{path} links outside the binary's folder")
        files[LIB + rel] = target.read_bytes()
        if target.stat().st_mode & 0o111:
            modes[LIB + rel] = 0o755
    return files, modes


@dataclass
class InstallReport:
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # changed conffiles left alone (.new beside them)
    seeded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # files of an older binary layout no longer shipped


def _members(image: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    total = 0
    with tarfile.open(image, "r:gz") as tar:
        for info in tar:
            name = info.name
            parts = name.split("/")
            if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ImageError(f"image member {name!r} escapes the root")
            if not info.isreg():
                raise ImageError(f"image member {name!r} is not a regular file")
            total += info.size
            if info.size > MAX_MEMBER or total > 4 * MAX_MEMBER:
                raise ImageError(f"image member {name!r} is too large")
            f = tar.extractfile(info)
            assert f is not None
            out[name] = f.read()
    return out


def install_image(image: Path, root: Path) -> InstallReport:
    files = _members(image)
    if "usr/share/edgert/IMAGE.json" not in files:
        raise ImageError(f"{image} is not a device image (no usr/share/edgert/IMAGE.json)")
    meta = json.loads(files["usr/share/edgert/IMAGE.json"])
    index = meta["files"]
    for name, digest in index.items():
        if hashlib.sha256(files.get(name, b"")).hexdigest() != digest:
            raise ImageError(f"image member {name!r} is missing or does not match IMAGE.json")
    image_arch, root_arch = meta.get("arch"), _root_arch(root)
    if image_arch and root_arch and image_arch != root_arch:
        raise ImageError(f"{image} is an {image_arch} image; the root {root} is {root_arch} "
                         f"(usr/lib/{root_arch}-linux-gnu): build the image with --arch {root_arch}")  # fmt: skip
    modes = {**MODES, **meta.get("modes", {})}
    bad = {n: m for n, m in modes.items() if m not in (0o644, 0o755)}
    if bad:
        raise ImageError(f"image modes {bad} refused: only 0644 and 0755 are laid down")
    report = InstallReport()
    for name, data in sorted(files.items()):
        dest = root / name
        if dest.exists() and dest.read_bytes() == data:
            report.unchanged.append(name)
            continue
        if name in CONFFILES and dest.exists():
            atomic_write(dest.with_name(dest.name + ".new"), data)  # the admin's edits win
            report.kept.append(name)
            continue
        atomic_write(dest, data)
        os.chmod(dest, modes.get(name, 0o644))
        report.written.append(name)
    lib = root / LIB
    if lib.is_dir():  # an upgrade drops what the old binary shipped and this one does not
        for path in sorted(lib.rglob("*"), reverse=True):
            rel = path.relative_to(root).as_posix()
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            elif rel not in files:
                path.unlink()
                report.removed.append(rel)
    _seed_state(root, files, report)
    return report


def _seed_state(root: Path, files: dict[str, bytes], report: InstallReport) -> None:
    """Install the image's bundles into the state dir only for models with no active version."""
    store = ModelStore(root / "var/lib/edgert")
    active = {m.name for m in store.active()}
    keys_dir = root / "etc/edgert/keys"
    for name in sorted(n for n in files if n.startswith("usr/share/edgert/bundles/")):
        bundle_path = root / name
        manifest = read_bundle(bundle_path, load_public_keys([keys_dir])).manifest
        if manifest.name in active:
            continue
        for pub in sorted(keys_dir.glob("*.pub")):
            store.trust(pub)
        store.install(bundle_path)
        report.seeded.append(f"{manifest.name} {manifest.version}")
