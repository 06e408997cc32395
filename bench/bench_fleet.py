"""Fleet controller benchmark against a real mosquitto on loopback. Prints a table, writes
bench/results/fleet.{json,png}.

For 20 and 100 simulated devices (real agents in one `edgert fleet simulate` process, 2 Hz of
inference each, health window shortened to 3 s):

- wall time of a full staged rollout 1/10/50/100 % (good version), from `create` to `completed`;
- a bad version (NaN on a third of the devices, ~12 ms slower on another third) rolled out the
  same way: seconds from the first bad report the controller received to the abort being
  published, and to every device serving the old version again;
- latency is not judged here (--max-p95-ratio 1000): 100 simulated devices saturate the 2 cores
  this runs on, so every device's p95 jumps during its window for reasons no real device has;
- the controller's CPU seconds and peak RSS (the controller runs in this process; the simulated
  devices in another one, so they are not counted).

    python bench/bench_fleet.py [--devices 20,100]
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import generate_keypair, load_private_key  # noqa: E402
from edge_runtime.fleet.controller import Controller, RolloutParams  # noqa: E402
from edge_runtime.fleet.db import ControllerDB  # noqa: E402
from edge_runtime.fleet.link import BrokerAuth, FleetLink  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.fleet_models import make_bundle  # noqa: E402

WINDOW = 3.0
SIM = """
import signal, sys, threading
from pathlib import Path
from edge_runtime.fleet.simulate import SimDevice, SimSettings
url, start, count, root, prefix, trust, fleet, bundle = sys.argv[1:]
s = SimSettings(url=url, state_root=Path(root), group=prefix, trust=Path(trust), fleet_key=Path(fleet),
                password="dev", prefix=prefix, rate_hz=2, levels=(0.3, 0.55, 0.85), telemetry_interval_s=1,
                bundles=(Path(bundle),))
devices = [SimDevice(i, s) for i in range(int(start), int(start) + int(count))]
for d in devices:
    d.start()
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
stop.wait()
for d in devices:
    d.stop()
"""


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def run(n: int, tmp: Path) -> dict[str, object]:
    keys, fleet = tmp / "keys", tmp / "fleet"
    generate_keypair(keys)
    generate_keypair(fleet)
    prefix = f"b{n}"
    accounts = {"controller": "ctl"} | {f"{prefix}-{i:03d}": "dev" for i in range(n)}
    broker = Broker(tmp / "broker", accounts)
    (tmp / "dev.pw").write_text("dev")
    v1 = make_bundle(tmp / "v1.edgepkg", keys / "signing.key", "1.0.0")
    v2 = make_bundle(tmp / "v2.edgepkg", keys / "signing.key", "2.0.0")
    bad = make_bundle(tmp / "v3.edgepkg", keys / "signing.key", "3.0.0", variant="bad")
    log = (tmp / "sim.log").open("wb")
    # At most 25 devices per simulator process: one Python process per 25 agents keeps the GIL
    # from dominating their latency figures (real devices each have their own CPU).
    sims = []
    for start in range(0, n, 25):
        count = min(25, n - start)
        sims.append(subprocess.Popen(
            [sys.executable, "-c", SIM, broker.url, str(start), str(count), str(tmp / "devices"), prefix,
             str(keys / "signing.pub"), str(fleet / "signing.pub"), str(v1)],
            stdout=subprocess.DEVNULL, stderr=log,
        ))  # fmt: skip
    db = ControllerDB(tmp / "fleet.db")
    link = FleetLink(
        BrokerAuth(broker.controller_url, "controller", "ctl"), load_private_key(fleet / "signing.key"), db
    )
    link.start()
    decisions: list[tuple[float, str]] = []
    ctl = Controller(link, db, lambda m: decisions.append((time.monotonic(), m)))
    try:
        wait(lambda: [v.serving("cls") for v in link.group(prefix)] == ["1.0.0"] * n, 300, f"{n} devices up")
        for b in (v2, bad):
            ctl.publish(b, [keys / "signing.pub"])
        params = dict(steps=[1, 10, 50, 100], min_devices=1, max_failure_rate=0.2, health_window=WINDOW,
                      min_inferences=5, max_p95_ratio=1000.0)  # fmt: skip

        c0, t0 = cpu_s(), time.monotonic()
        rid = ctl.create("cls", "2.0.0", prefix, "staged", RolloutParams(**params))  # type: ignore[arg-type]
        r = ctl.drive(rid)
        good_s, good_cpu = time.monotonic() - t0, cpu_s() - c0
        assert r.status == "completed", (r.reason, [d["reason"] for d in r.devices.values() if d["status"] == "failed"])
        failed_good = sum(d["status"] == "failed" for d in r.devices.values())
        wait(lambda: [v.serving("cls") for v in link.group(prefix)] == ["2.0.0"] * n, 120, "all on 2.0.0")

        decisions.clear()
        c0, t0 = cpu_s(), time.monotonic()
        params["min_devices"] = 2
        rid = ctl.create("cls", "3.0.0", prefix, "staged", RolloutParams(**params))  # type: ignore[arg-type]
        r = ctl.drive(rid)
        bad_cpu = cpu_s() - c0
        assert r.status == "aborted", r.reason
        first_bad = min(t for t, m in decisions if ": failed (" in m or m.startswith("ABORT"))
        abort_t = next(t for t, m in decisions if m.startswith("rollback published"))
        wait(lambda: [v.serving("cls") for v in link.group(prefix)] == ["2.0.0"] * n, 120, "all back on 2.0.0")
        back_t = time.monotonic()
        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "devices": n, "health_window_s": WINDOW, "staged_rollout_s": round(good_s, 2),
            "staged_failed_devices": failed_good, "controller_cpu_s_rollout": round(good_cpu, 2),
            "bad_moved_devices": len(r.devices), "abort_reason": r.reason,
            "first_bad_to_abort_s": round(abort_t - first_bad, 3), "first_bad_to_all_back_s": round(back_t - first_bad, 2),
            "controller_cpu_s_bad": round(bad_cpu, 2), "controller_peak_rss_mb": round(rss_mb, 1),
        }  # fmt: skip
    finally:
        link.stop()
        db.close()
        for sim in sims:
            sim.send_signal(signal.SIGTERM)
        for sim in sims:
            sim.wait(120)
        log.close()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="20,100")
    args = ap.parse_args()
    results = []
    for n in (int(x) for x in args.devices.split(",")):
        with tempfile.TemporaryDirectory() as d:
            results.append(run(n, Path(d)))
            print(json.dumps(results[-1]), flush=True)
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'devices':>8} {'staged 1/10/50/100 s':>21} {'failed':>7} {'bad->abort s':>13} "
          f"{'bad->all back s':>16} {'ctl CPU s':>10} {'ctl RSS MB':>11}")  # fmt: skip
    for r in results:
        print(f"{r['devices']:>8} {r['staged_rollout_s']:>21} {r['staged_failed_devices']:>7} "
              f"{r['first_bad_to_abort_s']:>13} {r['first_bad_to_all_back_s']:>16} "
              f"{r['controller_cpu_s_rollout']:>10} {r['controller_peak_rss_mb']:>11}")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [str(r["devices"]) for r in results]
    a.bar(xs, [r["staged_rollout_s"] for r in results])
    a.set_title(f"staged rollout 1/10/50/100% wall time (window {WINDOW:g} s)")
    a.set_xlabel("simulated devices")
    a.set_ylabel("s")
    w = 0.35
    idx = range(len(results))
    b.bar([i - w / 2 for i in idx], [r["first_bad_to_abort_s"] for r in results], w, label="first bad -> abort")
    b.bar([i + w / 2 for i in idx], [r["first_bad_to_all_back_s"] for r in results], w, label="-> all devices back")
    b.set_xticks(list(idx), xs)
    b.set_title("bad version: reaction time")
    b.set_xlabel("simulated devices")
    b.set_ylabel("s")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "fleet.png", dpi=100)
    print(f"wrote {out / 'fleet.json'} and {out / 'fleet.png'}")


if __name__ == "__main__":
    main()
