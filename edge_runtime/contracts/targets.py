"""The target names both sides agree on (a bundle's manifest names one; a device is one), read
from targets.toml, the one file that describes every target. The packer's full profiles
(pack/targets.py) read the same file; a device needs only the names."""

from __future__ import annotations

import tomllib
from functools import cache
from pathlib import Path
from typing import Any

TARGETS_FILE = Path(__file__).with_name("targets.toml")


@cache
def target_table() -> dict[str, dict[str, Any]]:
    raw: dict[str, dict[str, Any]] = tomllib.loads(TARGETS_FILE.read_text())
    return raw


def target_names() -> list[str]:
    return list(target_table())
