"""Shared fixtures: real models from wheels, real rendered images, real keys, free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from edge_runtime import samples, zoo
from edge_runtime.bundle import generate_keypair

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d)
    return d


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("other-keys")
    generate_keypair(d)
    return d


@pytest.fixture(scope="session")
def model_path() -> object:
    """zoo.fetch, for tests that need a real model file (downloaded once, hash-checked)."""
    return zoo.fetch


@pytest.fixture(scope="session")
def orientation_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("orientation")
    return samples.write_orientation_set(root / "calib", 32, seed=11), samples.write_orientation_set(
        root / "eval", 40, seed=12
    )


@pytest.fixture(scope="session")
def textline_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("textlines")
    return samples.write_textline_set(root / "calib", 48, seed=21), samples.write_textline_set(
        root / "eval", 48, seed=22
    )


@pytest.fixture(scope="session")
def page_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pages")
    return samples.write_page_set(root / "calib", 16, seed=31), samples.write_page_set(root / "eval", 12, seed=32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def edgert(*args: str, check: bool = False, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "edge_runtime.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env, **kw,  # type: ignore[call-overload]
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"edgert {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc  # type: ignore[no-any-return]
