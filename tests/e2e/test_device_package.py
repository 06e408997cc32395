"""The flashable package: image -> install into an empty root -> upgrade keeps the state dir;
the unit passes systemd-analyze verify (no output at all) and security (exposure <= 2.0, measured 1.5)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from edge_runtime.flash.rootfs import ImageError, install_image
from tests.conftest import REPO, edgert, reversion

pytestmark = pytest.mark.e2e


def _stand_in_binary(path: Path, text: str) -> Path:
    """The installer does not care what the binary is; the slow test builds the real one."""
    path.write_text(f"#!/bin/sh\necho {text}\n")
    path.chmod(0o755)
    return path


def _image(tmp: Path, name: str, binary_text: str, bundle: Path, keys: Path) -> Path:
    out = tmp / f"{name}.tar.gz"
    edgert("device-image", "-o", str(out), "--binary", str(_stand_in_binary(tmp / f"{name}-edgert", binary_text)),
           "--bundle", str(bundle), "--trust", str(keys / "signing.pub"), check=True)  # fmt: skip
    return out


def test_install_then_upgrade_preserves_state(tmp_path: Path, keys: Path, orientation_bundle: Path) -> None:
    root = tmp_path / "root"
    v1 = _image(tmp_path, "v1", "one", orientation_bundle, keys)
    proc = edgert("device-install", str(v1), "--root", str(root), check=True)
    assert "seeded ['orientation 1.0.0']" in proc.stderr
    assert (root / "usr/bin/edgert").stat().st_mode & 0o777 == 0o755
    for f in ("etc/systemd/system/edgert.service", "usr/lib/sysusers.d/edgert.conf", "etc/edgert/edgert.yaml",
              "etc/edgert/keys/signing.pub", "var/lib/edgert/models/orientation/active"):  # fmt: skip
        assert (root / f).is_file(), f
    state = root / "var/lib/edgert"
    assert (state / "models/orientation/active").read_text() == "1.0.0"

    # Life on the device: an update arrived, telemetry queued, the admin tuned the config.
    newer = reversion(orientation_bundle, "1.1.0", keys, tmp_path / "o-1.1.0.edgepkg")
    edgert("install", str(newer), "--state-dir", str(state), check=True)
    (state / "outbox.db").write_bytes(b"queued telemetry" * 100)
    config = root / "etc/edgert/edgert.yaml"
    config.write_text(config.read_text() + "threads: 2\n")
    before = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}

    v2 = _image(tmp_path, "v2", "two", orientation_bundle, keys)
    proc = edgert("device-install", str(v2), "--root", str(root), check=True)
    assert re.search(r"installed into .*: [1-9]\d* written", proc.stderr), proc.stderr  # the binary changed
    assert (root / "usr/bin/edgert").read_text().endswith("two\n")
    after = {p: p.read_bytes() for p in state.rglob("*") if p.is_file()}
    assert after == before  # models, active pointer, outbox: untouched
    assert (state / "models/orientation/active").read_text() == "1.1.0"
    assert config.read_text().endswith("threads: 2\n") and (root / "etc/edgert/edgert.yaml.new").exists()

    report = install_image(v2, root)  # idempotent: nothing left to do
    assert report.written == [] and report.seeded == [] and "usr/bin/edgert" in report.unchanged


def test_image_refuses_bad_members(tmp_path: Path) -> None:
    import io
    import tarfile

    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("../../etc/passwd")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ImageError, match="escapes the root"):
        install_image(bad, tmp_path / "root")
    assert not (tmp_path / "root").exists()


def test_image_refuses_unverified_bundle(tmp_path: Path, other_keys: Path, orientation_bundle: Path) -> None:
    binary = _stand_in_binary(tmp_path / "b", "x")
    proc = edgert("device-image", "-o", str(tmp_path / "x.tar.gz"), "--binary", str(binary),
                  "--bundle", str(orientation_bundle), "--trust", str(other_keys / "signing.pub"))  # fmt: skip
    assert proc.returncode == 1 and "does not verify" in proc.stderr and not (tmp_path / "x.tar.gz").exists()


def _analyze_root(tmp_path: Path, keys: Path, bundle: Path) -> Path:
    """An installed image plus what a real rootfs has: systemd's own units and /bin/kill."""
    root = tmp_path / "rootfs"
    install_image(_image(tmp_path, "img", "x", bundle, keys), root)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").symlink_to("usr/bin")
    shutil.copy2(shutil.which("kill") or "/usr/bin/kill", root / "usr/bin/kill")
    return root


def test_unit_passes_systemd_analyze(tmp_path: Path, keys: Path, orientation_bundle: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze missing: `make test` installs Debian's systemd package"
    root = _analyze_root(tmp_path, keys, orientation_bundle)
    verify = subprocess.run([analyze, "verify", f"--root={root}", "edgert.service"], capture_output=True, text=True)
    # Unknown keys only print warnings: any output at all is a failure, not only the exit code.
    assert verify.returncode == 0 and verify.stdout == "" and verify.stderr == "", verify.stdout + verify.stderr
    sec = subprocess.run(
        [analyze, "security", "--offline=true", str(REPO / "systemd/edgert.service")], capture_output=True, text=True
    )
    m = re.search(r"Overall exposure level for edgert.service: ([0-9.]+)", sec.stdout + sec.stderr)
    assert m, sec.stdout + sec.stderr
    assert float(m.group(1)) <= 2.0


def test_unit_contract() -> None:
    unit = (REPO / "systemd/edgert.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=edgert",
                 "ConfigurationDirectory=edgert", "User=edgert", "ProtectSystem=strict", "ProtectHome=yes",
                 "NoNewPrivileges=yes", "PrivateTmp=yes", "DevicePolicy=closed"):  # fmt: skip
        assert line in unit, line


def test_one_folder_binary_installs_under_usr_lib_and_upgrades_clean(
    tmp_path: Path, keys: Path, orientation_bundle: Path
) -> None:
    """The one-folder build (nothing to unpack at start) lands in /usr/lib/edgert with a wrapper at
    /usr/bin/edgert that execs it (same PID for systemd); links inside the folder are stored as the
    files they point to; an upgrade removes what the new build no longer ships."""

    def folder(name: str, extra: str) -> Path:
        d = tmp_path / name
        (d / "_internal" / "pkg").mkdir(parents=True)
        _stand_in_binary(d / "edgert", name)
        (d / "_internal" / "pkg" / "lib.so").write_bytes(b"\x7fELF" + name.encode())
        (d / "_internal" / extra).write_text(extra)
        (d / "_internal" / "lib.so").symlink_to("pkg/lib.so")
        return d

    root = tmp_path / "root"
    for name, extra in (("v1", "old-only.txt"), ("v2", "new-only.txt")):
        image = tmp_path / f"{name}.tar.gz"
        edgert("device-image", "-o", str(image), "--binary", str(folder(name, extra)), "--bundle",
               str(orientation_bundle), "--trust", str(keys / "signing.pub"), check=True)  # fmt: skip
        proc = edgert("device-install", str(image), "--root", str(root), check=True)
    lib = root / "usr/lib/edgert"
    wrapper = (root / "usr/bin/edgert").read_text()
    assert 'exec /usr/lib/edgert/edgert "$@"' in wrapper and (root / "usr/bin/edgert").stat().st_mode & 0o777 == 0o755
    assert (lib / "edgert").stat().st_mode & 0o777 == 0o755 and (lib / "edgert").read_text().endswith("v2\n")
    assert (lib / "_internal/pkg/lib.so").stat().st_mode & 0o777 == 0o644
    assert not (lib / "_internal/lib.so").is_symlink() and (lib / "_internal/lib.so").read_bytes() == b"\x7fELFv2"
    assert (lib / "_internal/new-only.txt").exists() and not (lib / "_internal/old-only.txt").exists()
    assert "removed 1 old file(s)" in proc.stderr
    # the wrapper really runs the folder's executable (pointed at this root instead of /)
    run = subprocess.run(["sh", "-c", wrapper.replace("/usr/lib/edgert", str(lib))], capture_output=True, text=True)
    assert run.stdout == "v2\n"


def test_a_folder_that_is_not_a_build_is_refused(tmp_path: Path, keys: Path, orientation_bundle: Path) -> None:
    (tmp_path / "empty").mkdir()
    proc = edgert("device-image", "-o", str(tmp_path / "x.tar.gz"), "--binary", str(tmp_path / "empty"),
                  "--bundle", str(orientation_bundle), "--trust", str(keys / "signing.pub"))  # fmt: skip
    assert proc.returncode == 1 and "without an 'edgert' executable" in proc.stderr


def _fake_elf(path: Path, machine: int) -> Path:
    """An ELF header of the given machine (62 x86-64, 183 aarch64): all the image reads of a binary."""
    path.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(11) + machine.to_bytes(2, "little") + bytes(44))
    path.chmod(0o755)
    return path


def test_image_is_for_one_cpu(tmp_path: Path, keys: Path, orientation_bundle: Path) -> None:
    arm = _fake_elf(tmp_path / "edgert-arm", 183)
    pub = str(keys / "signing.pub")
    # an x86-cpu bundle in an aarch64 image: refused, naming both
    proc = edgert("device-image", "-o", str(tmp_path / "a.tar.gz"), "--binary", str(arm),
                  "--bundle", str(orientation_bundle), "--trust", pub)  # fmt: skip
    assert proc.returncode == 1 and "targets x86-cpu (x86_64 devices); this image is for aarch64" in proc.stderr
    # --arch that the binary contradicts
    proc = edgert("device-image", "-o", str(tmp_path / "b.tar.gz"), "--binary", str(arm), "--arch", "x86_64",
                  "--trust", pub)  # fmt: skip
    assert proc.returncode == 1 and "is an aarch64 executable" in proc.stderr
    # an arm64 bundle goes into the arm64 image, which records its CPU ...
    arm_bundle = reversion(orientation_bundle, "1.0.0", keys, tmp_path / "o-arm.edgepkg", target="arm64-cpu")
    image = tmp_path / "arm.tar.gz"
    edgert("device-image", "-o", str(image), "--binary", str(arm), "--arch", "arm64", "--bundle", str(arm_bundle),
           "--trust", pub, check=True)  # fmt: skip
    with tarfile.open(image) as tar:
        meta = json.loads(tar.extractfile("usr/share/edgert/IMAGE.json").read())  # type: ignore[union-attr]
    assert meta["arch"] == "aarch64"
    # ... and an x86-64 root refuses it before writing anything
    root = tmp_path / "x86root"
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    proc = edgert("device-install", str(image), "--root", str(root))
    assert proc.returncode == 1 and "is an aarch64 image; the root" in proc.stderr and "is x86_64" in proc.stderr
    assert not (root / "usr/bin").exists()
    (root / "usr/lib/x86_64-linux-gnu").rmdir()
    (root / "usr/lib/aarch64-linux-gnu").mkdir()
    edgert("device-install", str(image), "--root", str(root), check=True)
    assert (root / "var/lib/edgert/models/orientation/active").read_text() == "1.0.0"
