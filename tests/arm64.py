"""The aarch64 device for tests: the arm64 binary built by packaging/build-binary.sh --arch arm64,
installed from an arm64 device image into an arm64 root file system, and run there under
qemu-user emulation (chroot; the network is the host's, so a client or a broker on the host's
loopback is reachable as on a real device's).

The device root is an overlay on the cached build root (an arm64 Debian): each test module gets
a fresh, writable copy that costs nothing and is gone when it ends.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from edge_runtime.pack import emulation
from tests.conftest import REPO

DIST = REPO / "dist" / "arm64"
STAMP = DIST / ".sources.sha256"
QEMU_CPU = emulation.QEMU_CPU
CAPABILITY = 3  # packaging/build-arm64.sh's exit code for "this host cannot run aarch64 code"


def why_not() -> str | None:
    """Why this host cannot build or run the aarch64 device at all (a skip, with the reason)."""
    if platform.machine() != "x86_64":
        return f"the arm64 job emulates aarch64 on an x86-64 host; this host is {platform.machine()}"
    if os.geteuid() != 0:
        return "the arm64 job needs root (debootstrap, chroot, binfmt_misc); run the suite as root"
    return None


def _sources_digest() -> str:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    h = hashlib.sha256()
    for name in sorted(f for f in files if f):
        path = REPO / name.decode()
        h.update(name + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return h.hexdigest()


def build_binary() -> tuple[Path, float]:
    """dist/arm64/edgert-dir, built unless a build of these very sources is there; (path, seconds)."""
    digest = _sources_digest()
    folder = DIST / "edgert-dir"
    if (folder / "edgert").is_file() and STAMP.is_file() and STAMP.read_text() == digest:
        return folder, 0.0
    t0 = time.monotonic()
    env = {**os.environ, "EDGERT_LAYOUT": "onedir"}
    proc = subprocess.run(["bash", "packaging/build-binary.sh", "--arch", "arm64"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=2400)  # fmt: skip
    if proc.returncode == CAPABILITY:
        import pytest

        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, (
        f"arm64 build failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    STAMP.write_text(digest)
    return folder, time.monotonic() - t0


class DeviceRoot:
    """A writable arm64 root (overlay over the build root) with /proc, where commands run under qemu."""

    def __init__(self) -> None:
        self.lower = emulation.arm64_root()
        self.base = Path(tempfile.mkdtemp(prefix="edgert-arm64-dev-"))
        self.path = self.base / "root"
        for d in ("upper", "work", "root"):
            (self.base / d).mkdir()
        opts = f"lowerdir={self.lower},upperdir={self.base / 'upper'},workdir={self.base / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.path)], check=True)
        subprocess.run(["mount", "-t", "proc", "proc", str(self.path / "proc")], check=True)
        # The build root's venv (/opt/venv) stays visible underneath; the binary never looks there.

    def env(self, **extra: str) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": "/root", "QEMU_CPU": QEMU_CPU, "PYTHONUNBUFFERED": "1", **extra}

    def command(self, *args: str) -> list[str]:
        return [shutil.which("chroot") or "/usr/sbin/chroot", str(self.path), *args]

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), env=self.env(), capture_output=True, text=True, timeout=timeout)

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")  # noqa: SIM115 - the process owns it; closed with the process
        try:
            return subprocess.Popen(self.command(*args), env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()

    def close(self) -> None:
        subprocess.run(["umount", str(self.path / "proc")], capture_output=True)
        subprocess.run(["umount", str(self.path)], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
