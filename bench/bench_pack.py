"""Benchmark the packer on real models: fp32 vs INT8 size, latency (1 thread, batch 1 and 8)
and accuracy against fp32. Prints a table, writes bench/results/pack.json and pack.png.

    python bench/bench_pack.py [--target x86-cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edge_runtime.contracts.bundle import PreprocessSpec, generate_keypair
from edge_runtime.pack import samples, zoo
from edge_runtime.pack.pipeline import PackRequest, pack
from edge_runtime.pack.validate import Gate

WRITERS = {
    "orientation": samples.write_orientation_set,
    "textline": samples.write_textline_set,
    "page": samples.write_page_set,
}
MODELS: dict[str, tuple[Any, int, int, Gate]] = {  # model -> (dataset writer, calib, eval, gate), from models/zoo.toml
    key: (WRITERS[r.pack.samples], r.pack.calib, r.pack.eval, r.pack.make_gate())
    for key, r in zoo.RECIPES.items()
    if r.pack.samples is not None
}
OUT = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                flags = Path("/proc/cpuinfo").read_text()
                return line.split(":", 1)[1].strip() + (
                    " (VNNI)" if "avx512_vnni" in flags or "avx_vnni" in flags else " (no VNNI)"
                )
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="x86-cpu")
    args = ap.parse_args()
    console = Console(width=180)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        generate_keypair(tmp / "keys")
        for key, (writer, n_cal, n_eval, gate) in MODELS.items():
            recipe = zoo.RECIPES[key]
            cal, ev = writer(tmp / key / "calib", n_cal, 1), writer(tmp / key / "eval", n_eval, 2)
            res = pack(
                PackRequest(
                    model=zoo.fetch(key), target=args.target, calib=cal, eval=ev, name=key, version="1.0.0",
                    key=tmp / "keys" / "signing.key", out=tmp / f"{key}.edgepkg",
                    preprocess=PreprocessSpec.model_validate(recipe.preprocess),
                    labels=list(recipe.labels) if recipe.labels else None, gate=gate, allow_slower=True,
                ),
                console,
            )  # fmt: skip
            r = res.report
            out = next(iter(r["outputs"].values()))
            lat = r["latency_ms"]
            rows.append(
                {
                    "model": key,
                    "fp32_mb": r["size"]["reference_bytes"] / 1e6,
                    "int8_mb": r["size"]["candidate_bytes"] / 1e6,
                    "ratio": r["size"]["ratio"],
                    "gzip_ratio": r["size"]["gzip_ratio"],
                    "fp32_b1_ms": lat["reference"]["batch1"]["p50"],
                    "int8_b1_ms": lat["candidate"]["batch1"]["p50"],
                    "fp32_b8_ms": (lat["reference"]["batch8"] or {}).get("p50"),
                    "int8_b8_ms": (lat["candidate"]["batch8"] or {}).get("p50"),
                    "cosine": out["cosine_mean"],
                    "top1_agreement": out.get("top1_agreement"),
                    "mask_iou": out.get("mask_iou"),
                    "acc_fp32": (r.get("accuracy") or {}).get("reference"),
                    "acc_int8": (r.get("accuracy") or {}).get("candidate"),
                    "kept_float": len(r["recovery"]["kept_float"]),
                    "compute_ops_only": bool(r["recovery"]["op_types"]),
                }
            )
    OUT.mkdir(exist_ok=True)
    (OUT / "pack.json").write_text(json.dumps({"cpu": cpu_name(), "target": args.target, "rows": rows}, indent=2))
    table = Table(title=f"edgert pack, {args.target}, on {cpu_name()} (1 thread)")
    cols = ["model", "fp32 MB", "int8 MB", "x smaller (gz)", "b1 fp32/int8 ms", "b8 fp32/int8 ms", "cosine",
            "top-1 agree", "acc fp32/int8", "mask IoU"]  # fmt: skip
    for c in cols:
        table.add_column(c)

    def f(v: float | None, p: int = 2) -> str:
        return "-" if v is None else f"{v:.{p}f}"

    for r in rows:
        table.add_row(
            r["model"], f(r["fp32_mb"]), f(r["int8_mb"]), f"{r['ratio']:.2f} ({r['gzip_ratio']:.2f})",
            f"{f(r['fp32_b1_ms'])} / {f(r['int8_b1_ms'])}", f"{f(r['fp32_b8_ms'])} / {f(r['int8_b8_ms'])}",
            f(r["cosine"], 4), f(r["top1_agreement"], 3), f"{f(r['acc_fp32'], 3)} / {f(r['acc_int8'], 3)}",
            f(r["mask_iou"], 3),
        )  # fmt: skip
    console.print(table)
    plot(rows, OUT / "pack.png", args.target)
    console.print(f"wrote {OUT / 'pack.json'} and {OUT / 'pack.png'}")


def plot(rows: list[dict[str, object]], path: Path, target: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [str(r["model"]) for r in rows]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (a, b, title) in zip(
        axes,
        [
            ("fp32_mb", "int8_mb", "model size (MB)"),
            ("fp32_b1_ms", "int8_b1_ms", "latency batch 1 (ms)"),
            ("fp32_b8_ms", "int8_b8_ms", "latency batch 8 (ms)"),
        ],
        strict=True,
    ):
        ax.bar(x - 0.2, [float(r[a] or 0) for r in rows], 0.4, label="fp32")  # type: ignore[arg-type]
        ax.bar(x + 0.2, [float(r[b] or 0) for r in rows], 0.4, label="int8")  # type: ignore[arg-type]
        ax.set_xticks(x, names, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"edgert pack {target}: fp32 vs INT8 ({cpu_name()}, 1 thread)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
