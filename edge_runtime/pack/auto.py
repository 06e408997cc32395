"""`--precision auto`: pack every precision the target runs, ship the fastest that passes the gate.

Candidates: INT8 (static QDQ per-channel with the recovery ladder), FP16 where the target runs
it (a GPU: jetson-gpu), and fp32. Each is packed and judged as if asked for alone, with the
latency gate off (a slower candidate is a row of the table, not an error). Then:

- where this host's kernels are the device's (x86-cpu), the fastest passing candidate at batch 1
  wins; a candidate within the latency noise margin (10%) of the fastest counts as as fast, and
  among those the smallest artifact wins (INT8 at parity ships: it is 3-4x smaller);
- elsewhere (ARM and GPU targets, timed here only on x86 or under emulation), the first passing
  candidate in the order INT8, FP16, fp32 wins: the order of their speed on those devices.

The shipped bundle's report holds the table of all candidates and the reason for the choice.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from edge_runtime.contracts.bundle import load_private_key, read_bundle, write_bundle
from edge_runtime.pack.onnx_pack import LATENCY_MARGIN
from edge_runtime.pack.report import render_report
from edge_runtime.pack.request import PackError, PackRequest, PackResult
from edge_runtime.pack.targets import TargetProfile


def candidates(profile: TargetProfile, artifact: str) -> list[str]:
    if artifact == "tflite":
        return ["int8"]
    gpu = any(p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") for p in profile.providers)
    return ["int8", *(["fp16"] if gpu else []), "fp32"]


def _p50(report: dict[str, Any], batch: str) -> float | None:
    got = (report.get("latency_ms") or {}).get("candidate", {}).get(batch)
    return float(got["p50"]) if got else None


def _row(precision: str, report: dict[str, Any], refused: str | None) -> dict[str, Any]:
    out: dict[str, Any] = next(iter((report.get("outputs") or {}).values()), {})
    size = report.get("size") or {}
    return {"precision": precision, "passed": refused is None, "refused": refused,
            "batch1_ms": _p50(report, "batch1"), "batch8_ms": _p50(report, "batch8"),
            "bytes": size.get("candidate_bytes"), "cosine": out.get("cosine_mean"),
            "top1_agreement": out.get("top1_agreement")}  # fmt: skip


def choose(rows: list[dict[str, Any]], timed_here: bool) -> tuple[str, str]:
    passing = [r for r in rows if r["passed"]]
    if not timed_here:
        r = passing[0]
        return r["precision"], "first passing in the order int8, fp16, fp32 (device speed; not timed on the device)"
    timed = [r for r in passing if r["batch1_ms"] is not None]
    if not timed:
        return passing[0]["precision"], "no latency measured; first passing"
    fastest = min(r["batch1_ms"] for r in timed)
    near = [r for r in timed if r["batch1_ms"] <= fastest * (1 + LATENCY_MARGIN)]
    best = min(near, key=lambda r: r["bytes"] or 0)
    why = f"fastest at batch 1 ({best['batch1_ms']:.2f} ms"
    if len(near) > 1:
        why += f"; within {LATENCY_MARGIN:.0%} of the fastest, the smallest"
    return best["precision"], why + ")"


def pack_auto(
    req: PackRequest,
    profile: TargetProfile,
    artifact: str,
    run: Callable[[PackRequest], PackResult],
    console: Console,
) -> PackResult:
    rows: list[dict[str, Any]] = []
    results: dict[str, PackResult] = {}
    with tempfile.TemporaryDirectory(prefix="edgert-auto-") as d:
        for precision in candidates(profile, artifact):
            console.log(f"--precision auto: packing the {precision} candidate")
            one = dataclasses.replace(req, precision=precision, out=Path(d) / f"{precision}.edgepkg", allow_slower=True)  # type: ignore[arg-type]
            try:
                results[precision] = run(one)
                rows.append(_row(precision, results[precision].report, None))
            except PackError as e:
                rows.append(_row(precision, e.report or {}, str(e)))
        if not results:
            raise PackError("--precision auto: no candidate passed the gate: "
                            + "; ".join(f"{r['precision']}: {r['refused']}" for r in rows))  # fmt: skip
        chosen, why = choose(rows, profile.judge_arch is None)
        console.log(f"--precision auto: shipping {chosen}: {why}")
        return _reseal(req, results[chosen], rows, chosen, why)


def _reseal(req: PackRequest, result: PackResult, rows: list[dict[str, Any]], chosen: str, why: str) -> PackResult:
    """The chosen bundle, signed again with the candidates table added to its report."""
    key = load_private_key(req.key)
    bundle = read_bundle(result.path, [key.public_key()])
    report = {**result.report, "candidates": rows, "chosen": {"precision": chosen, "why": why}}
    fields = bundle.manifest.model_dump(mode="json")
    fields.update(validation=report, files=[], created="")
    files = dict(bundle.files)
    files["report.md"] = render_report(bundle.manifest, report).encode()
    out = req.out or Path.cwd() / bundle.manifest.filename
    manifest = write_bundle(out, fields, files, key)
    return PackResult(out, manifest, report)
