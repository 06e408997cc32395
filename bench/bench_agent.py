"""Fleet agent benchmark against a real mosquitto on loopback. Prints a table, writes
bench/results/agent.{json,png}.

- telemetry: records/s buffered into the outbox with the broker down, outbox disk bytes per record,
  records/s drained once the broker is back (PUBACK before delete), and inference latency p50/p99
  with the outbox idle vs busy (the outbox is off the inference path);
- update: seconds from the signed desired state being published to the new version serving, for a
  10 MB bundle sent as MQTT chunks.

    python bench/bench_agent.py
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import (  # noqa: E402
    generate_keypair,
    load_private_key,
    load_public_keys,
    sha256_bytes,
    write_bundle,
)
from edge_runtime.contracts.client import Client  # noqa: E402
from edge_runtime.device.agent.session import Agent, AgentConfig  # noqa: E402
from edge_runtime.fleet import publish_bundle, publish_desired  # noqa: E402
from edge_runtime.serving.runtime import Runtime  # noqa: E402
from edge_runtime.serving.store import ModelStore  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.conftest import Daemon  # noqa: E402
from tests.fleet_models import classifier, inputs, make_bundle  # noqa: E402

N_RECORDS = 5000


def latency(rt: Runtime, n: int = 400) -> tuple[float, float]:
    x = inputs(1)
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        rt.infer("cls", {"x": x})
        t.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(t, 50)), float(np.percentile(t, 99))


def big_bundle(out: Path, key: Path, version: str, mb: int = 10) -> Path:
    """The benchmark classifier plus an unused 10 MB initializer: a bundle of realistic size."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_model_from_string(classifier())
    pad = np.random.default_rng(0).standard_normal(mb * (1 << 20) // 4).astype(np.float32)  # incompressible
    m.graph.initializer.append(numpy_helper.from_array(pad, "padding"))
    model = m.SerializeToString()
    warm = io.BytesIO()
    np.savez(warm, x=np.zeros((1, 64), np.float32))
    write_bundle(out, {"name": "cls", "version": version, "target": "x86-cpu", "runtime": "onnxruntime",
                       "model": "model.onnx", "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 64]}],
                       "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 4]}], "precision": "fp32",
                       "batching": {"batchable": True, "warmup": "warmup.npz"}, "source_sha256": sha256_bytes(model),
                       "key_id": ""},
                 {"model.onnx": model, "warmup.npz": warm.getvalue()}, load_private_key(key))  # fmt: skip
    return out


def main() -> None:
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        generate_keypair(tmp / "keys")
        generate_keypair(tmp / "fleet")
        broker = Broker(tmp / "broker", {"controller": "c", "bench": "b"})
        store = ModelStore(tmp / "state")
        store.trust(tmp / "keys" / "signing.pub")
        store.install(make_bundle(tmp / "v1.edgepkg", tmp / "keys" / "signing.key", "1.0.0"))
        rt = Runtime(store.trusted_keys(), threads=1)
        rt.load(store.bundle_path("cls", "1.0.0"))
        idle = latency(rt)

        broker.stop()  # outage: everything goes to the outbox
        cfg = AgentConfig(url=broker.url, device_id="bench", group="g", fleet_keys=load_public_keys([tmp / "fleet" / "signing.pub"]),
                          target="x86-cpu", username="bench", password="b", telemetry_interval_s=3600)  # fmt: skip
        agent = Agent(cfg, rt, store, store.trusted_keys)
        agent.start()
        record = {"models": {"cls": {"version": "1.0.0", "rows": 1234, "p95_ms": 1.5, "top1": {"0": 10, "3": 20}}}}
        t0 = time.perf_counter()
        for _ in range(N_RECORDS):
            agent.outbox.put("metrics", record)
        put_rate = N_RECORDS / (time.perf_counter() - t0)
        st = agent.outbox.stats()
        disk_per_record = st["disk_bytes"] / max(1, st["depth"])

        # Drain alone: the broker is back and nothing else runs.
        broker.start()
        t0 = time.perf_counter()
        while agent.outbox.peek(1) and time.perf_counter() - t0 < 300:  # peek: cheap, unlike stats()
            time.sleep(0.02)
        drain_s = time.perf_counter() - t0
        drained = N_RECORDS

        # Then inference while the outbox is busy: a producer writes records as fast as it can
        # and the sender drains them to the broker at the same time.
        busy_stop = threading.Event()

        def hammer() -> None:
            while not busy_stop.is_set():
                agent.outbox.put("metrics", record)

        h = threading.Thread(target=hammer)
        h.start()
        busy = latency(rt)
        busy_stop.set()
        h.join()
        agent.stop()
        rt.close()
        results["telemetry"] = {
            "buffered_per_s": put_rate, "disk_bytes_per_record": disk_per_record, "drained_records": drained,
            "drain_per_s": drained / drain_s, "infer_idle_p50_ms": idle[0], "infer_idle_p99_ms": idle[1],
            "infer_busy_p50_ms": busy[0], "infer_busy_p99_ms": busy[1],
        }  # fmt: skip

        # Update of a 10 MB bundle over MQTT chunks, through a real daemon.
        (tmp / "pw").write_text("b")
        d = Daemon(store.root, "--broker", broker.url, "--device-id", "bench", "--group", "g",
                   "--fleet-key", str(tmp / "fleet" / "signing.pub"), "--broker-password-file", str(tmp / "pw"))  # fmt: skip
        ctl = broker.client("controller")
        big = big_bundle(tmp / "v2.edgepkg", tmp / "keys" / "signing.key", "2.0.0")
        t0 = time.perf_counter()
        ref = publish_bundle(ctl, big)
        t_chunks = time.perf_counter() - t0
        t0 = time.perf_counter()
        publish_desired(ctl, load_private_key(tmp / "fleet" / "signing.key"), "bench", 1,
                        {"cls": {"version": "2.0.0", "bundle": ref, "health": {"window_s": 1, "min_inferences": 0}}})  # fmt: skip
        c = Client(d.url)
        while c.metadata("cls")["versions"][0] != "2.0.0" and time.perf_counter() - t0 < 120:
            time.sleep(0.02)
        update_s = time.perf_counter() - t0
        c.close()
        d.stop()
        ctl.loop_stop()
        broker.stop()
        results["update"] = {"bundle_mb": big.stat().st_size / 1e6, "chunks": len(ref.chunks),
                             "publish_chunks_s": t_chunks, "desired_to_serving_s": update_s}  # fmt: skip

    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "agent.json").write_text(json.dumps(results, indent=2))
    t, u = results["telemetry"], results["update"]  # type: ignore[assignment]
    rows = [
        ("records/s buffered into the outbox (broker down)", f"{t['buffered_per_s']:.0f}"),  # type: ignore[index]
        ("outbox disk bytes per record", f"{t['disk_bytes_per_record']:.0f}"),  # type: ignore[index]
        ("records/s drained after the outage (PUBACK, then delete)", f"{t['drain_per_s']:.0f}"),  # type: ignore[index]
        ("inference p50 / p99 ms, outbox idle", f"{t['infer_idle_p50_ms']:.3f} / {t['infer_idle_p99_ms']:.3f}"),  # type: ignore[index]
        (
            "inference p50 / p99 ms, outbox busy (writing + draining)",
            f"{t['infer_busy_p50_ms']:.3f} / {t['infer_busy_p99_ms']:.3f}",
        ),  # type: ignore[index]
        (f"publish a {u['bundle_mb']:.1f} MB bundle as {u['chunks']} chunks, s", f"{u['publish_chunks_s']:.2f}"),  # type: ignore[index]
        ("desired state published -> new version serving, s", f"{u['desired_to_serving_s']:.2f}"),  # type: ignore[index]
    ]
    for k, v in rows:
        print(f"{k:62s} {v}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.bar(["buffered/s", "drained/s"], [t["buffered_per_s"], t["drain_per_s"]])  # type: ignore[index]
    a.set_title("telemetry records per second")
    b.bar(["idle p50", "busy p50", "idle p99", "busy p99"],
          [t["infer_idle_p50_ms"], t["infer_busy_p50_ms"], t["infer_idle_p99_ms"], t["infer_busy_p99_ms"]])  # type: ignore[index]  # fmt: skip
    b.set_title("inference latency (ms) with the outbox idle / busy")
    fig.suptitle(f"edgert agent; 10 MB update: desired -> serving {u['desired_to_serving_s']:.2f} s")  # type: ignore[index]
    fig.tight_layout()
    fig.savefig(out / "agent.png", dpi=100)


if __name__ == "__main__":
    main()
