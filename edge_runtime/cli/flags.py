"""One vocabulary for the CLI's flags, and the old spellings kept for one release.

    --signing-key KEY   a PRIVATE key that signs (pack: bundles; fleet: control messages)
    --trust PUB         PUBLIC key(s) bundles must be signed by (verify, inspect, infer, install,
                        device-image, fleet publish, fleet simulate)
    --fleet-key PUB     the fleet's PUBLIC key that control messages must be signed by (serve, simulate)
    --broker URL        the MQTT broker (serve and fleet alike), with --broker-user and
                        --broker-password-file
    --state-dir DIR     a device's state directory (serve, install, status, infer)

Deprecated (one release): --key (pack, fleet: --signing-key; verify, inspect, infer: --trust),
serve's --mqtt/--mqtt-user/--mqtt-password-file, fleet's --username/--password-file.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class Deprecated(argparse.Action):
    """An old spelling: stores into the new option's destination and says which name to use."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", append: bool = False, **kw: Any) -> None:
        kw.pop("help", None)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)
        self.new, self.append = new, append

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        print(f"edgert: {option} is deprecated here; use {self.new} (the old spelling goes in the next release)",
              file=sys.stderr)  # fmt: skip
        if self.append:
            items = list(getattr(ns, self.dest, None) or [])
            items.append(values)
            setattr(ns, self.dest, items)
        else:
            setattr(ns, self.dest, values)


def alias(parser: Any, old: str, new: str, dest: str, append: bool = False, default: Any = None) -> None:
    parser.add_argument(old, dest=dest, action=Deprecated, new=new, append=append, default=default)


def require(args: argparse.Namespace, dest: str, flag: str) -> None:
    """A required option that has a deprecated spelling (argparse cannot require either of two)."""
    if getattr(args, dest, None) in (None, []):
        prog = f"edgert {args.command}"
        print(f"{prog}: error: the following arguments are required: {flag}", file=sys.stderr)
        raise SystemExit(2)
