"""`edgert`: the command line. A thin layer that parses arguments and calls the library.

Each subcommand is registered lazily from a registry ("module:adder", as uvicorn names its
protocol implementations): only the module of the command being run is imported, so
`edgert serve` never imports the packer or the fleet controller, and a device binary built
without them answers "not in this build" for `pack` or `fleet` instead of crashing.

Exit codes: 0 success, 1 a refusal or failure the message explains (bad bundle, failed
gate), 2 a usage error. A mistake ends in one line that says what was wrong and what was
expected; the traceback is shown only with -v (anywhere on the command line).
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
    "completion": Command(
        "edge_runtime.cli.completion:add_parser", "print a shell completion script (bash or zsh)", "device"
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
    p = StrictParser(prog="edgert", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO and show tracebacks (anywhere)")
    p.add_argument("--version", action="version", version=f"edgert {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=StrictParser)
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


class StrictParser(argparse.ArgumentParser):
    """No silent abbreviations, and an unknown option names the closest known one."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        kw.setdefault("allow_abbrev", False)
        super().__init__(*a, **kw)

    def error(self, message: str) -> Any:
        if message.startswith("unrecognized arguments:"):
            import difflib

            known = [o for action in self._actions for o in action.option_strings]
            for action in self._actions:  # the top-level parser reports the subcommand's unknown options
                if isinstance(action, argparse._SubParsersAction):
                    for parser in action.choices.values():
                        known += [o for a in parser._actions for o in a.option_strings]
            hints = []
            for arg in message.split(":", 1)[1].split():
                if arg.startswith("-"):
                    close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1)
                    if close:
                        hints.append(f"{arg}: did you mean {close[0]}?")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


def _split_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """-v/--verbose is accepted anywhere (before or after the subcommand), up to a ``--``."""
    out, verbose = [], False
    for i, arg in enumerate(argv):
        if arg == "--":
            out += argv[i:]
            break
        if arg in ("-v", "--verbose"):
            verbose = True
            continue
        out.append(arg)
    return out, verbose


def main(argv: list[str] | None = None) -> int:
    argv, verbose = _split_verbose(list(sys.argv[1:] if argv is None else argv))
    chosen = _chosen(argv)
    args = build_parser([chosen] if chosen else []).parse_args(argv)
    args.verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s" if verbose else "%(levelname)s %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:
        if _missing_part(e):
            return _not_in_build(args.command, COMMANDS[args.command], e)(args)
        return _refuse(args.command, e, verbose, unexpected=True)
    except Exception as e:
        # The project's own errors are written for people (BundleError, PackError, DatasetError...),
        # and so are a missing file or a refused value; anything else is named by its type.
        ours = type(e).__module__.startswith("edge_runtime")
        return _refuse(args.command, e, verbose, unexpected=not (ours or isinstance(e, (ValueError, OSError))))


def _refuse(command: str, e: BaseException, verbose: bool, unexpected: bool) -> int:
    from edge_runtime.cli.console import describe_error, fail

    if verbose:
        import traceback

        traceback.print_exception(e)
    text = describe_error(e)
    if unexpected:
        text = f"{type(e).__name__}: {text}" + ("" if verbose else " (run with -v for the traceback)")
    return fail(f"edgert {command}: {text}")


if __name__ == "__main__":
    sys.exit(main())
