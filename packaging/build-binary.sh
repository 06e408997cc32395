#!/usr/bin/env bash
# Build the single device binary dist/edgert with PyInstaller.
#
# PyInstaller cannot cross-compile: the binary runs on the architecture it was built on.
# x86-64 is built and tested here. For arm64 (Raspberry Pi 4/5, Jetson), run this same script
# on arm64: on the device itself, on an arm64 CI runner (GitHub's ubuntu-24.04-arm, or a
# self-hosted runner), or in an arm64 container under qemu-user (slow, but it works:
# `docker run --platform linux/arm64 -v "$PWD":/src -w /src python:3.11-bookworm packaging/build-binary.sh`).
# Build on the oldest glibc you target: the binary needs that glibc or newer.
set -euo pipefail
cd "$(dirname "$0")/.."
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
