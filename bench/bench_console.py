"""Fleet console benchmark: a real mosquitto, 20 and 100 simulated devices (real agents, 2 Hz of
inference each, state every second), `edgert fleet console` as its own process, and Debian's
chromium (headless) as the operator. Prints a table, writes bench/results/console.{json,png}.

- page load: Navigation Timing (request start to the load event) of the fleet page, median of 7;
  the HTML's size;
- update latency: a probe device publishes a new state (a version string never seen before) at
  t0; the time until that text is in the page's DOM, measured by a MutationObserver in the page
  (both clocks are this machine's), 25 probes at random phases;
- the console's CPU (its own process: the controller's broker session, the history sampler, the
  live stream's renders) as a share of one core, over 20 s with no page open and over 20 s with
  the fleet page open; the live stream's messages per second.

    python bench/bench_console.py [--devices 20,100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import generate_keypair  # noqa: E402
from tests.broker import Broker  # noqa: E402
from tests.browser import chromium  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.fleet_models import make_bundle  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from bench_fleet import SIM, wait  # noqa: E402  (the same simulated devices as the fleet benchmark)

OBSERVER = """
window.seen = {}; window.want = [];
new MutationObserver(() => {
  const text = document.body.textContent;
  for (const m of window.want) if (!(m in window.seen) && text.includes(m)) window.seen[m] = Date.now();
}).observe(document.body, {subtree: true, childList: true, characterData: true});
"""
TOKEN = "bench-console-token-0123456789"


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def run(n: int, tmp: Path) -> dict[str, object]:
    keys, fleet = tmp / "keys", tmp / "fleet"
    generate_keypair(keys)
    generate_keypair(fleet)
    prefix = f"c{n}"
    accounts = {"controller": "ctl"} | {f"{prefix}-{i:03d}": "dev" for i in range(n)}
    broker = Broker(tmp / "broker", accounts)
    (tmp / "ctl.pw").write_text("ctl")
    (tmp / "token").write_text(TOKEN)
    v1 = make_bundle(tmp / "v1.edgepkg", keys / "signing.key", "1.0.0")
    log = (tmp / "sim.log").open("wb")
    sims = [
        subprocess.Popen([sys.executable, "-c", SIM, broker.url, str(start), str(min(25, n - start)),
                          str(tmp / "devices"), prefix, str(keys / "signing.pub"), str(fleet / "signing.pub"), str(v1)],
                         stdout=subprocess.DEVNULL, stderr=log)
        for start in range(0, n, 25)
    ]  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    console = subprocess.Popen(
        [sys.executable, "-m", "edge_runtime.cli", "fleet", "--broker", broker.controller_url, "--signing-key",
         str(fleet / "signing.key"), "--state", str(tmp / "fleet.db"), "--broker-user", "controller",
         "--broker-password-file", str(tmp / "ctl.pw"), "console", "--port", str(port), "--token-file",
         str(tmp / "token")],
        stdout=log, stderr=log,
    )  # fmt: skip
    probe = broker.client("controller")
    try:
        wait(lambda: _up(url) and metric(url, "edgert_console_devices") >= n, 300, f"{n} devices in the console")
        time.sleep(5)  # every device has sent a state since
        # The console alone (no page open).
        c0, t0 = proc_cpu_s(console.pid), time.monotonic()
        time.sleep(20)
        idle_cpu = (proc_cpu_s(console.pid) - c0) / (time.monotonic() - t0)
        with chromium() as b:
            loads, sizes = [], []
            for _ in range(7):
                b.get(url + "/")
                loads.append(b.execute_script(
                    "const t = performance.getEntriesByType('navigation')[0]; return t.loadEventEnd - t.requestStart"))  # fmt: skip
                sizes.append(b.execute_script("return performance.getEntriesByType('navigation')[0].transferSize"))
            b.execute_script(OBSERVER)
            time.sleep(3)
            # The page open and live.
            e0, c0, t0 = metric(url, "edgert_console_events_sent_total"), proc_cpu_s(console.pid), time.monotonic()
            time.sleep(20)
            span = time.monotonic() - t0
            open_cpu = (proc_cpu_s(console.pid) - c0) / span
            events_per_s = (metric(url, "edgert_console_events_sent_total") - e0) / span
            latencies = []
            for k in range(25):
                marker = f"probe{n}x{k}x{random.randrange(10**6)}"
                b.execute_script("window.want = [arguments[0]];", marker)
                state = {"device": "zz-probe", "group": prefix, "ts": time.time(),
                         "models": {"cls": {"version": marker, "serving": marker}}}  # fmt: skip
                t_pub = time.time() * 1000
                probe.publish("edgert/v1/devices/zz-probe/state", json.dumps(state), qos=1).wait_for_publish(10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    seen = b.execute_script("return window.seen[arguments[0]]", marker)
                    if seen:
                        latencies.append(seen - t_pub)
                        break
                    time.sleep(0.02)
                time.sleep(random.uniform(0.3, 1.5))
        latencies.sort()
        return {
            "devices": n,
            "page_load_ms_median": round(statistics.median(loads), 1),
            "page_kb": round(statistics.median(sizes) / 1024, 1),
            "update_latency_ms_p50": round(statistics.median(latencies), 1),
            "update_latency_ms_p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1),
            "updates_seen": len(latencies),
            "console_cpu_no_page": round(idle_cpu, 3),
            "console_cpu_page_open": round(open_cpu, 3),
            "stream_messages_per_s": round(events_per_s, 2),
        }
    finally:
        probe.loop_stop()
        probe.disconnect()
        console.send_signal(signal.SIGTERM)
        console.wait(30)
        for sim in sims:
            sim.send_signal(signal.SIGTERM)
        for sim in sims:
            sim.wait(120)
        log.close()
        broker.stop()


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


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
    (out / "console.json").write_text(json.dumps(results, indent=2))
    print(f"\n{'devices':>8} {'load ms':>8} {'page KB':>8} {'update p50 ms':>14} {'update p95 ms':>14} "
          f"{'CPU no page':>12} {'CPU page open':>14} {'stream msg/s':>13}")  # fmt: skip
    for r in results:
        print(f"{r['devices']:>8} {r['page_load_ms_median']:>8} {r['page_kb']:>8} {r['update_latency_ms_p50']:>14} "
              f"{r['update_latency_ms_p95']:>14} {r['console_cpu_no_page']:>12.1%} {r['console_cpu_page_open']:>14.1%} "
              f"{r['stream_messages_per_s']:>13}")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = [str(r["devices"]) for r in results]
    idx = list(range(len(results)))
    w = 0.27
    a.bar([i - w for i in idx], [r["page_load_ms_median"] for r in results], w, label="page load (median)")
    a.bar(idx, [r["update_latency_ms_p50"] for r in results], w, label="update latency p50")
    a.bar([i + w for i in idx], [r["update_latency_ms_p95"] for r in results], w, label="update latency p95")
    a.set_xticks(idx, xs)
    a.set_xlabel("simulated devices")
    a.set_ylabel("ms")
    a.set_title("fleet page in chromium")
    a.legend()
    b.bar([i - 0.2 for i in idx], [100 * r["console_cpu_no_page"] for r in results], 0.4, label="no page open")
    b.bar([i + 0.2 for i in idx], [100 * r["console_cpu_page_open"] for r in results], 0.4, label="fleet page open")
    b.set_xticks(idx, xs)
    b.set_xlabel("simulated devices")
    b.set_ylabel("% of one core")
    b.set_title("console (controller) process CPU")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "console.png", dpi=100)
    print(f"wrote {out / 'console.json'} and {out / 'console.png'}")


if __name__ == "__main__":
    main()
