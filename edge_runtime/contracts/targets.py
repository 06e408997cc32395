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


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This CPU's feature flags (``flags`` in /proc/cpuinfo); None where that cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    return {
        f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()
    }


def host_lacks(target: str, flags: set[str] | None = None) -> str | None:
    """Why this CPU cannot run bundles for ``target`` (targets.toml ``cpu_flags``: one of them is
    needed), or None when it can. A CPU whose flags cannot be read is given the benefit of the doubt."""
    needed = list(target_table().get(target, {}).get("cpu_flags", []))
    have = cpu_flags() if flags is None else flags
    if not needed or have is None or have & set(needed):
        return None
    return f"target {target} needs a CPU with {' or '.join(needed)}, and this CPU has none of them"


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
