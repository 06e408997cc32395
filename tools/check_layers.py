"""The layer rule of edge_runtime/, checked from the source (README "Layout").

Folders are layers; a module may import from its own layer or lower ones, never a higher one:

    5  cli/                         thin front end, registers each side's commands lazily
    4  pack/  fleet/  flash/        host side; the three never import each other
    3  device/                      daemon, HTTP server, frame sources, the agent
    2  serving/                     runtime, batcher, store, statistics: works with no network
    1  contracts/  backends/        shared formats and protocols; model runners (independent)

Extra rules: serving/, backends/ and contracts/ never import paho (MQTT); backends/ never import
contracts/ (they run arrays, they know nothing of bundles); contracts/bundle.py imports nothing
else of the project. Every import counts, including ones inside functions and under
TYPE_CHECKING: a lazy import still runs on some path, and a type-only one is a dependency a
reader has to follow.

Usage: python tools/check_layers.py [PACKAGE_DIR]   (exit 1 and one line per violation)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "edge_runtime"
LAYERS: dict[str, int] = {
    "contracts": 1,
    "backends": 1,
    "serving": 2,
    "device": 3,
    "pack": 4,
    "fleet": 4,
    "flash": 4,
    "cli": 5,
}
NO_MQTT = {"serving", "backends", "contracts"}


def _folder(module: str) -> str | None:
    """The layer folder of a dotted module name inside the package, or None for the package root."""
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else None


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from edge_runtime import serving` imports the subpackage too
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names if f"{name}.{a.name}".count(".") == 1]
    return out


def violations(package_dir: Path) -> list[str]:
    package_dir = Path(package_dir)
    found: list[str] = []
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        here = _folder(module)
        if here is None:
            continue  # the package root: a lazy facade (edge_runtime.Runtime) and __version__
        for line, name in _imports(path, module):
            where = f"{path.relative_to(package_dir.parent)}:{line}"
            if here in NO_MQTT and name.split(".")[0] == "paho":
                found.append(f"{where}: {here}/ imports MQTT ({name}); only device/ and fleet/ talk MQTT")
            there = _folder(name)
            if module == f"{PACKAGE}.contracts.bundle" and name.startswith(f"{PACKAGE}."):
                found.append(f"{where}: contracts/bundle.py must import nothing else of the project ({name})")
                continue
            if there is None or there == here:
                continue
            if LAYERS[there] > LAYERS[here]:
                found.append(f"{where}: {here}/ (layer {LAYERS[here]}) imports {name} (layer {LAYERS[there]})")
            elif LAYERS[there] == LAYERS[here]:
                found.append(
                    f"{where}: {here}/ imports its sibling {name}; layer {LAYERS[here]} folders are independent"
                )
    return found


def main(argv: list[str]) -> int:
    package_dir = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / PACKAGE
    found = violations(package_dir)
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} layer violations (see tools/check_layers.py for the rule)")
        return 1
    print(f"layers ok: {sum(1 for _ in package_dir.rglob('*.py'))} modules")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
