"""The layer rule (README "Layout", tools/check_layers.py) holds for the real tree and catches a
planted violation; the CLI imports only the side of the command being run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from check_layers import violations

pytestmark = pytest.mark.unit


def test_real_tree_keeps_the_layers() -> None:
    assert violations(REPO / "edge_runtime") == []


@pytest.mark.parametrize(
    ("module", "line", "expected"),
    [
        ("device/daemon.py", "from edge_runtime.fleet.controller import Controller", "device/ (layer 3) imports"),
        ("serving/batcher.py", "import edge_runtime.device.config", "serving/ (layer 2) imports"),
        ("serving/cache.py", "import paho.mqtt.client", "serving/ imports MQTT"),
        ("pack/zoo.py", "from edge_runtime.fleet import publish", "pack/ imports its sibling"),
        ("contracts/bundle.py", "from edge_runtime.contracts import fleet", "must import nothing else"),
        ("backends/base.py", "from edge_runtime.contracts.bundle import Bundle", "backends/ imports its sibling"),
    ],
)
def test_planted_violation_is_found(tmp_path: Path, module: str, line: str, expected: str) -> None:
    tree = tmp_path / "edge_runtime"
    shutil.copytree(REPO / "edge_runtime", tree, ignore=shutil.ignore_patterns("__pycache__"))
    target = tree / module
    target.write_text(target.read_text() + f"\n\ndef _planted() -> None:\n    {line}  # noqa\n")
    found = violations(tree)
    assert len(found) == 1 and expected in found[0] and module in found[0], found
    # and the command-line form fails with it
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "check_layers.py"), str(tree)], capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode == 1 and expected in proc.stdout


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=120)  # fmt: skip


def test_serve_imports_neither_packer_nor_fleet() -> None:
    proc = _run(
        textwrap.dedent("""
        import sys
        from edge_runtime.cli.main import build_parser
        build_parser(["serve"]).parse_args(["serve", "--port", "0"])
        host = sorted(m for m in sys.modules if m.startswith(("edge_runtime.pack", "edge_runtime.fleet",
                      "edge_runtime.flash", "edge_runtime.cli.host", "onnx", "tensorflow")) and m != "onnxruntime")
        print("HOST", host)
    """)
    )
    assert proc.returncode == 0, proc.stderr
    assert "HOST []" in proc.stdout, proc.stdout


# A device build lacks the host folders: block their import as the PyInstaller spec excludes them.
BLOCK_HOST = textwrap.dedent("""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.startswith(("edge_runtime.pack", "edge_runtime.fleet", "edge_runtime.flash", "edge_runtime.cli.host")):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Block())
    from edge_runtime.cli.main import main
""")


@pytest.mark.parametrize("command", [["pack", "m.onnx", "--target", "x86-cpu"], ["fleet", "devices"], ["demo"]])
def test_device_build_says_not_in_this_build(command: list[str]) -> None:
    proc = _run(BLOCK_HOST + f"\nsys.exit(main({command!r}))")
    assert proc.returncode == 1, proc.stderr
    assert "not in this build" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_device_build_still_serves_help_and_lists_every_command() -> None:
    proc = _run(BLOCK_HOST + "\nmain(['--help'])")
    assert "serve" in proc.stdout and "fleet" in proc.stdout and "pack" in proc.stdout
    proc = _run(BLOCK_HOST + "\nmain(['serve', '--help'])")
    assert "--state-dir" in proc.stdout and "--broker" in proc.stdout
