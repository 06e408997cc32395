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


ARCH_ALIASES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def normalize_arch(name: str) -> str:
    """``uname -m`` / Debian / Docker spellings to one: x86_64 or aarch64 (ValueError otherwise)."""
    try:
        return ARCH_ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCH_ALIASES)}") from None


def target_archs(target: str) -> list[str]:
    """The CPUs a device of ``target`` has (targets.toml ``arch``)."""
    return list(target_table().get(target, {}).get("arch", []))


def elf_arch(path: Path) -> str | None:
    """x86_64 or aarch64 from an executable's ELF header; None when it is not an ELF file of either."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return {62: "x86_64", 183: "aarch64"}.get(machine)
