#!/usr/bin/env bash
# Build the device binary (dist/edgert one file, dist/edgert-dir one folder) with PyInstaller.
#
# PyInstaller cannot cross-compile: the binary runs on the architecture it was built on. On an
# x86-64 host, `--arch arm64` builds the aarch64 binary inside an arm64 Debian root under qemu-user
# (packaging/build-arm64.sh; root and three Debian packages, installed when missing) into dist/arm64/.
# Build on the oldest glibc you target: the binary needs that glibc or newer.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--arch" ]; then
  case "${2:-}" in
    arm64|aarch64) [ "$(uname -m)" = aarch64 ] || exec bash packaging/build-arm64.sh ;;
    x86_64|amd64|"$(uname -m)") ;;
    *) echo "build-binary: unknown --arch ${2:-}; expected arm64 or x86_64" >&2; exit 2 ;;
  esac
  shift 2
fi
PYTHON=${PYTHON:-python3.11}
VENV=${BUILD_VENV:-.venv-build}
# EDGERT_LAYOUT=onefile|onedir|both (default both) and EDGERT_BACKENDS=onnx,litert (default both)
# are read by the spec; DIST is where the builds land (default dist/).
DIST=${DIST:-dist}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# Only what a device runs, plus the builder: no host tools can end up in the binary.
"$VENV/bin/python" -m pip install --quiet ".[device]" "pyinstaller>=6.10"
cd packaging
"../$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
  --distpath "../$DIST" --workpath "../build/pyinstaller-$(basename "$DIST")" edgert.spec
cd ..
ls -ld "$DIST/edgert" "$DIST/edgert-dir" 2>/dev/null || true
