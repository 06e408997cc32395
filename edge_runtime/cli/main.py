"""`edgert`: the command line. A thin layer that parses arguments and calls the library.

Each subcommand is registered lazily from a registry ("module:adder", as uvicorn names its
protocol implementations): only the module of the command being run is imported, so
`edgert serve` never imports the packer or the fleet controller, and a device binary built
without them answers "not in this build" for `pack` or `fleet` instead of crashing.

Exit codes: 0 success, 1 a refusal or failure the message explains (bad bundle, failed
gate), 2 a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edge_runtime import __version__


@dataclass(frozen=True)
class Command:
    adder: str  # "module:function" that adds the subcommand's parser
    help: str
    side: str  # what a build must hold to run it: "device", "host" (packer), "fleet"


COMMANDS: dict[str, Command] = {
    "keys": Command("edge_runtime.cli.bundle_cmds:add_keys", "signing keys", "device"),
    "pack": Command(
        "edge_runtime.cli.host.pack_cmds:add_pack", "quantize, validate, gate, sign and bundle a model", "host"
    ),
    "verify": Command(
        "edge_runtime.cli.bundle_cmds:add_verify", "exit 0 only for an intact bundle signed by a trusted key", "device"
    ),
    "inspect": Command(
        "edge_runtime.cli.bundle_cmds:add_inspect", "show a bundle's manifest and report, or a model's ops", "device"
    ),
    "install": Command(
        "edge_runtime.cli.device_cmds:add_install", "verify a bundle and make it active in a state dir", "device"
    ),
    "serve": Command(
        "edge_runtime.cli.device_cmds:add_serve", "the on-device daemon (Open Inference Protocol v2)", "device"
    ),
    "status": Command(
        "edge_runtime.cli.device_cmds:add_status", "versions, outbox and rollbacks of a state dir", "device"
    ),
    "infer": Command(
        "edge_runtime.cli.device_cmds:add_infer", "score an image folder, video or .npy folder offline", "device"
    ),
    "device-image": Command(
        "edge_runtime.cli.host.flash_cmds:add_device_image", "write a root-filesystem tarball for devices", "host"
    ),
    "device-install": Command(
        "edge_runtime.cli.host.flash_cmds:add_device_install", "lay a device image into a root directory", "host"
    ),
    "tools": Command(
        "edge_runtime.cli.host.pack_cmds:add_tools", "the isolated TFLite converter environment (TensorFlow)", "host"
    ),
    "fleet": Command(
        "edge_runtime.cli.host.fleet_cmds:add_parser",
        "fleet controller: devices, publish, rollouts, simulation",
        "fleet",
    ),
    "demo": Command(
        "edge_runtime.cli.host.demo:add_parser", "fetch a real model, pack it, verify, load and run it", "host"
    ),
}

# Top-level folders a build may lack (the device binary excludes them whole).
OPTIONAL_PARTS = ("edge_runtime.pack", "edge_runtime.fleet", "edge_runtime.flash", "edge_runtime.cli.host")
HOST_LIBRARIES = {"onnx", "sympy", "matplotlib", "tensorflow"}


def _missing_part(e: ModuleNotFoundError) -> bool:
    name = e.name or ""
    return name.startswith(OPTIONAL_PARTS) or name.split(".")[0] in HOST_LIBRARIES


def _not_in_build(name: str, cmd: Command, e: ModuleNotFoundError) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from edge_runtime.cli.console import fail

        extra = {"host": "pack", "fleet": "fleet", "device": "device"}[cmd.side]
        return fail(
            f"edgert {name}: not in this build (it lacks {e.name}; the device binary has no packer or fleet "
            f"controller); install the host package: pip install 'edge-runtime[{extra}]'"
        )

    return run


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first argument that is not an option)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser with full options for ``commands`` (all when None); the others are listed by
    name and help only, so their modules are not imported."""
    p = argparse.ArgumentParser(prog="edgert", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    p.add_argument("--version", action="version", version=f"edgert {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = set(COMMANDS) if commands is None else set(commands)
    for name, cmd in COMMANDS.items():
        if name not in wanted:
            sub.add_parser(name, help=cmd.help, add_help=False)
            continue
        module, _, attr = cmd.adder.partition(":")
        try:
            adder: Callable[[Any], None] = getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if not _missing_part(e):
                raise
            stub = sub.add_parser(name, help=f"{cmd.help} (not in this build)", add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(func=_not_in_build(name, cmd, e))
            continue
        adder(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = _chosen(argv)
    args = build_parser([chosen] if chosen else []).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        if _missing_part(e):
            return _not_in_build(args.command, COMMANDS[args.command], e)(args)
        raise


if __name__ == "__main__":
    sys.exit(main())
