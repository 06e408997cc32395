"""Flashable-package commands (host): `device-image` and `device-install`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_runtime.cli.console import console, fail
from edge_runtime.contracts.bundle import BundleError


def cmd_device_image(args: argparse.Namespace) -> int:
    from edge_runtime.flash.rootfs import DEFAULT_CONFIG, DEFAULT_UNIT, ImageError, build_image

    try:
        config = Path(args.config).read_text() if args.config else DEFAULT_CONFIG
        index = build_image(
            Path(args.out), Path(args.binary), [Path(b) for b in args.bundle], [Path(k) for k in args.trust],
            Path(args.unit) if args.unit else DEFAULT_UNIT, config, args.arch,
        )  # fmt: skip
    except (ImageError, BundleError, OSError) as e:
        return fail(f"edgert device-image: {e}")
    console.print(f"wrote {args.out}: {len(index)} files")
    return 0


def cmd_device_install(args: argparse.Namespace) -> int:
    from edge_runtime.flash.rootfs import ImageError, install_image

    try:
        report = install_image(Path(args.image), Path(args.root))
    except (ImageError, BundleError, OSError) as e:
        return fail(f"edgert device-install: {e}")
    console.print(
        f"installed into {args.root}: {len(report.written)} written, {len(report.unchanged)} unchanged, "
        f"kept local {report.kept or 'none'}, seeded {report.seeded or 'none'}, "
        f"removed {len(report.removed)} old file(s)"
    )
    return 0


def add_device_image(sub: Any) -> None:
    img = sub.add_parser("device-image", help="write a root-filesystem tarball: binary, unit, config, keys, bundles")
    img.add_argument("-o", "--out", required=True)
    img.add_argument(
        "--binary",
        required=True,
        help="the one-folder build dist/edgert-dir (starts fastest; installed under /usr/lib/edgert) or the"
        " one-file dist/edgert (packaging/build-binary.sh)",
    )
    img.add_argument("--arch", choices=["arm64", "aarch64", "x86_64", "amd64"],
                     help="the devices' CPU (default: the binary's); binary and bundles must match it")  # fmt: skip
    img.add_argument("--bundle", action="append", default=[], help="initial bundle; repeatable")
    img.add_argument("--trust", action="append", required=True, help="trusted public key (file or dir)")
    img.add_argument("--unit", help="systemd unit (default: systemd/edgert.service)")
    img.add_argument("--config", help="default edgert.yaml")
    img.set_defaults(func=cmd_device_image)


def add_device_install(sub: Any) -> None:
    dins = sub.add_parser("device-install", help="lay a device image into a root directory (idempotent)")
    dins.add_argument("image")
    dins.add_argument("--root", required=True, help="target root file system, e.g. a mounted image")
    dins.set_defaults(func=cmd_device_install)
