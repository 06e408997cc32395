"""aarch64 code on an x86-64 host: the arm64 build root under qemu-user, used to judge ARM artifacts
on the kernels an ARM device runs (ONNX Runtime's and XNNPACK's aarch64 code paths), not on x86's.

The root is the one ``packaging/build-binary.sh --arch arm64`` creates and caches (an arm64 Debian
with /opt/venv holding the device's runtimes). A job runs there as
``chroot ROOT /opt/venv/bin/python -m edge_runtime.backends.run_npz JOB`` with this checkout's
``edge_runtime`` copied beside it, so the backend code is the host's own and only the CPU differs.

Speed under emulation is ~300x below native: the root judges what is computed, never how fast.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = Path(__file__).resolve().parents[1]
QEMU_CPU = "cortex-a72"  # a real core (Raspberry Pi 4); qemu's default "max" has features no board has


class EmulationError(RuntimeError):
    """The aarch64 environment is missing, or the emulated run failed; the message says which."""


def arm64_root() -> Path:
    env = os.environ.get("EDGERT_ARM64_ROOT")
    return Path(env) if env else Path.home() / ".cache" / "edge-runtime" / "arm64-root"


def native() -> bool:
    return platform.machine().lower() in ("aarch64", "arm64")


def problem(root: Path | None = None) -> str | None:
    """Why aarch64 code cannot run here (naming the missing piece and its package), or None."""
    if native():
        return None
    root = root or arm64_root()
    if not (root / ".edgert-ready").is_file() or not (root / "opt/venv/bin/python").exists():
        return (
            f"no arm64 root at {root} (create it: bash packaging/build-binary.sh --arch arm64;"
            " or set EDGERT_ARM64_ROOT)"
        )
    if os.geteuid() != 0:
        return "running aarch64 code in the arm64 root needs root (chroot)"
    reg = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not reg.is_file():
        return "qemu-aarch64 is not registered with binfmt_misc (Debian packages qemu-user-static and binfmt-support)"
    if not reg.read_text().startswith("enabled"):
        return "qemu-aarch64 is registered with binfmt_misc but disabled (update-binfmts --enable qemu-aarch64)"
    return None


@dataclass(frozen=True)
class JudgeRun:
    outputs: list[list[np.ndarray]]
    machine: str  # what platform.machine() said where the outputs were computed
    runtime: str  # e.g. "onnxruntime 1.32.0"
    how: str  # "qemu-user (cortex-a72)" or "native"


def run_on_aarch64(
    model: bytes, runtime: str, feeds: list[dict[str, np.ndarray]], names: list[str], timeout: float = 3600
) -> JudgeRun:
    """Run ``model`` over every sample's ``feeds`` on aarch64 with the device's backend (one thread)."""
    why = problem()
    if why:
        raise EmulationError(why)
    root = None if native() else arm64_root()
    base = Path(tempfile.mkdtemp(prefix="edgert-judge-", dir=root / "tmp" if root else None))
    try:
        shutil.copytree(PACKAGE, base / "src" / "edge_runtime", ignore=shutil.ignore_patterns("__pycache__"))
        (base / "model.bin").write_bytes(model)
        np.savez(base / "in.npz", **{f"s{i}_{j}": f[n] for i, f in enumerate(feeds) for j, n in enumerate(names)})  # type: ignore[arg-type]
        inside = Path("/") / base.relative_to(root) if root else base
        job = {"model": str(inside / "model.bin"), "runtime": runtime, "inputs": str(inside / "in.npz"),
               "outputs": str(inside / "out.npz"), "names": names, "samples": len(feeds), "threads": 1}  # fmt: skip
        (base / "job.json").write_text(json.dumps(job))
        env = {"PATH": "/opt/venv/bin:/usr/bin:/bin", "HOME": "/root", "PYTHONPATH": str(inside / "src"),
               "QEMU_CPU": os.environ.get("QEMU_CPU", QEMU_CPU), "PYTHONDONTWRITEBYTECODE": "1"}  # fmt: skip
        python = ["/opt/venv/bin/python"] if root else [os.environ.get("EDGERT_ARM64_PYTHON", "python3")]
        chroot = shutil.which("chroot") or "/usr/sbin/chroot"
        cmd = [*([chroot, str(root)] if root else []), *python, "-m", "edge_runtime.backends.run_npz"]
        with _proc_mounted(root):
            proc = subprocess.run([*cmd, str(inside / "job.json")], env=env, capture_output=True, text=True,
                                  timeout=timeout)  # fmt: skip
        if proc.returncode != 0:
            raise EmulationError(f"the aarch64 run failed ({_exit(proc.returncode)}): {proc.stderr.strip()[-1500:]}")
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        with np.load(base / "out.npz", allow_pickle=False) as data:
            keys = sorted({int(k.split("_")[1]) for k in data.files if k.startswith("s0_")})
            outputs = [[data[f"s{i}_{k}"] for k in keys] for i in range(len(feeds))]
        how = f"qemu-user ({env['QEMU_CPU']})" if root else "native"
        return JudgeRun(outputs, str(info["machine"]), str(info["runtime"]), how)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


@contextmanager
def _proc_mounted(root: Path | None) -> Iterator[None]:
    """/proc inside the root for the run (runtimes read /proc/self); never the host's /sys (see
    packaging/build-arm64.sh: ONNX Runtime then parses the x86 topology and crashes)."""
    if root is None or os.path.ismount(root / "proc"):
        yield
        return
    (root / "proc").mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(root / "proc")], capture_output=True)
