#!/usr/bin/env bash
# Build the device binary for aarch64 on an x86-64 Debian/Ubuntu host, from the same spec as x86-64:
# PyInstaller runs inside an arm64 Debian root file system under qemu-user emulation.
#
#   bash packaging/build-binary.sh --arch arm64      (or this script directly)
#   -> dist/arm64/edgert (one file) and dist/arm64/edgert-dir/ (one folder)
#
# Needs root (debootstrap, chroot, binfmt_misc) and three Debian packages, installed when missing:
# qemu-user-static, binfmt-support, debootstrap. The arm64 root is cached between runs in
# $EDGERT_ARM64_ROOT (default ~/.cache/edge-runtime/arm64-root; measured here: 2 min 15 s and 295 MB
# to create, then about 1 min of pip and 2 min 40 s of PyInstaller per build).
#
# Traps (seen here): never mount the host's /sys into the root: ONNX Runtime's cpuinfo then parses the
# x86 topology and segfaults at import (without it, it only warns); QEMU_CPU names a real core; pip in
# the root needs the host's CA bundle. Speed under emulation is for correctness only (~330x slower).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${EDGERT_ARM64_ROOT:-$HOME/.cache/edge-runtime/arm64-root}
SUITE=${EDGERT_ARM64_SUITE:-bookworm}
MIRROR=${EDGERT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
export QEMU_CPU=${QEMU_CPU:-cortex-a72}

die() { echo "build-arm64: $*" >&2; exit 1; }
# Exit 3: this host cannot run aarch64 code at all (no root, no binfmt_misc); a test may skip on it.
lack() { echo "build-arm64: $*" >&2; exit 3; }

[ "$(uname -m)" = x86_64 ] || [ "$(uname -m)" = aarch64 ] || die "host is $(uname -m); expected x86_64 (emulated) or aarch64"
if [ "$(uname -m)" = x86_64 ]; then
  [ "$(id -u)" = 0 ] || lack "needs root (debootstrap, chroot, binfmt_misc); run as root, or build on an arm64 machine with packaging/build-binary.sh"
  missing=""
  command -v qemu-aarch64-static >/dev/null || missing="$missing qemu-user-static"
  command -v update-binfmts >/dev/null || missing="$missing binfmt-support"
  command -v debootstrap >/dev/null || missing="$missing debootstrap"
  if [ -n "$missing" ]; then
    echo "build-arm64: installing Debian packages:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null \
      || lack "could not install$missing (Debian packages; apt-get failed)"
  fi
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
      || lack "binfmt_misc is not mounted and cannot be (a container without the privilege?): aarch64 programs cannot run here"
  fi
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
    || lack "cannot register qemu-aarch64 with binfmt_misc (package binfmt-support, qemu-user-static)"
fi

if [ ! -e "$ROOT/.edgert-ready" ]; then
  echo "build-arm64: creating the arm64 root in $ROOT (debootstrap $SUITE; about 2 minutes)"
  rm -rf "$ROOT"
  mkdir -p "$(dirname "$ROOT")"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,libpython3.11,binutils,ca-certificates,file "$SUITE" "$ROOT" "$MIRROR" >/dev/null \
    || die "debootstrap failed (network to $MIRROR?)"
  chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv
  touch "$ROOT/.edgert-ready"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
trap 'umount "$ROOT/proc" 2>/dev/null || true' EXIT

# The tracked sources, as committed plus the working tree's changes to tracked files.
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$ROOT/src"
inroot() { chroot "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root QEMU_CPU="$QEMU_CPU" \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
  PIP_DISABLE_PIP_VERSION_CHECK=1 EDGERT_LAYOUT="${EDGERT_LAYOUT:-both}" \
  EDGERT_BACKENDS="${EDGERT_BACKENDS:-onnx,litert}" "$@"; }
echo "build-arm64: installing edge-runtime[device] and PyInstaller (aarch64 wheels)"
inroot pip install -q --only-binary=:all: "/src[device]" "pyinstaller>=6.10" 2>&1 | grep -v "is ignored" || true
inroot python -c "import onnxruntime, ai_edge_litert, edge_runtime" 2>/dev/null \
  || die "the aarch64 runtime does not import under emulation (see: chroot $ROOT /opt/venv/bin/python -c 'import onnxruntime')"
echo "build-arm64: PyInstaller under emulation (a few minutes)"
inroot sh -c 'cd /src/packaging && pyinstaller --noconfirm --clean --log-level WARN --distpath /src/dist --workpath /src/build/pyi edgert.spec'
rm -rf dist/arm64 && mkdir -p dist/arm64
cp -a "$ROOT/src/dist/." dist/arm64/
built=""
for exe in dist/arm64/edgert dist/arm64/edgert-dir/edgert; do
  [ -f "$exe" ] || continue
  file "$exe" | grep -q "ARM aarch64" || die "$exe is not an aarch64 executable: $(file -b "$exe")"
  built="$built $exe"
done
[ -n "$built" ] || die "PyInstaller wrote no executable into dist/arm64"
# The binary must start on aarch64 code: a crash here (the cpuinfo trap, a missing library) fails
# the build with its cause instead of shipping a binary that cannot run.
for exe in $built; do
  rel=${exe#dist/arm64/}
  out=$(inroot "/src/dist/$rel" --version 2>&1) || die "$exe does not run under emulation: $out"
  case "$exe" in */edgert-dir/edgert) sized=$(dirname "$exe") ;; *) sized=$exe ;; esac
  echo "build-arm64: $exe: $(file -b "$exe" | cut -d, -f1-2); $sized $(du -sh "$sized" | cut -f1); --version: $out"
done
