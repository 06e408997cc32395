"""Whose kernels judge a candidate (pack/judge.py) and what a host without aarch64 emulation is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_runtime.pack import emulation
from edge_runtime.pack.judge import choose
from edge_runtime.pack.request import PackError
from edge_runtime.pack.targets import get_target

pytestmark = pytest.mark.unit


@pytest.fixture()
def no_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGERT_ARM64_ROOT", str(tmp_path / "nowhere"))
    monkeypatch.delenv("EDGERT_JUDGE", raising=False)
    monkeypatch.setattr(emulation, "native", lambda: False)
    return tmp_path / "nowhere"


def test_auto_falls_back_to_this_host_and_says_why(no_root: Path) -> None:
    j = choose("auto", get_target("arm64-cpu"))
    assert j.where == "host" and "no arm64 root at" in j.why and "build-binary.sh --arch arm64" in j.why
    assert j.describe("exact")["why"] == j.why
    x86 = choose("auto", get_target("x86-cpu"))
    assert x86.where == "host" and "runs on this kind of CPU" in x86.why


def test_asking_for_aarch64_without_emulation_names_the_missing_piece(no_root: Path) -> None:
    with pytest.raises(PackError, match=r"--judge aarch64: no arm64 root at .*nowhere"):
        choose("aarch64", get_target("jetson-gpu"))
    with pytest.raises(PackError, match="runs on x86 kernels"):
        choose("aarch64", get_target("x86-cpu"))


def test_environment_overrides_auto_only(no_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGERT_JUDGE", "host")
    assert choose("auto", get_target("arm64-cpu")).why == "asked (EDGERT_JUDGE=host)"
    monkeypatch.setenv("EDGERT_JUDGE", "arm")
    with pytest.raises(PackError, match="EDGERT_JUDGE 'arm': expected one of auto, host, aarch64"):
        choose("auto", get_target("arm64-cpu"))
    with pytest.raises(PackError, match="--judge 'x': expected"):
        choose("x", get_target("arm64-cpu"))


def test_problem_names_root_binfmt_and_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emulation, "native", lambda: False)
    root = tmp_path / "root"
    assert "no arm64 root" in (emulation.problem(root) or "")
    (root / "opt/venv/bin").mkdir(parents=True)
    (root / "opt/venv/bin/python").touch()
    (root / ".edgert-ready").touch()
    monkeypatch.setattr(emulation.os, "geteuid", lambda: 1000)
    assert emulation.problem(root) == "running aarch64 code in the arm64 root needs root (chroot)"


def test_every_arm_target_is_judged_on_aarch64_and_has_its_cpus() -> None:
    for name in ("arm64-cpu", "jetson-gpu", "npu"):
        assert get_target(name).judge_arch == "aarch64"
    assert get_target("x86-cpu").judge_arch is None
    assert get_target("x86-cpu").arch == ["x86_64"] and "aarch64" in get_target("npu").arch
