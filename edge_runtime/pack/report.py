"""The human-readable report stored in every bundle (report.md) and printed by the CLI."""

from __future__ import annotations

from typing import Any

from edge_runtime.contracts.bundle import BundleManifest


def _ms(x: dict[str, float] | None) -> str:
    return f"{x['p50']:.2f}" if x else "n/a"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_report(manifest: BundleManifest, report: dict[str, Any]) -> str:
    q = manifest.quantization
    lines = [
        f"# {manifest.name} {manifest.version} for {manifest.target}",
        "",
        f"- precision: {manifest.precision} ({q.get('mode', 'none')}"
        + (f", {q['flavour']}, {q.get('calibration', '')}" if q.get("flavour") else "")
        + ")",
        f"- evaluation samples: {report['samples']}",
    ]
    judged = report.get("judged_on")
    if judged:
        how = f" under {judged['how']}" if judged.get("how") else ""
        lines.append(f"- judged on: {judged['kernels']}{how} ({judged['why']})")
    size = report.get("size")
    if size:
        lines.append(
            f"- size: fp32 {size['reference_bytes'] / 1e6:.2f} MB -> {size['candidate_bytes'] / 1e6:.2f} MB"
            f" ({size['ratio']:.2f}x smaller; gzip'd as in the bundle {size['gzip_ratio']:.2f}x)"
        )
    rec = report.get("recovery", {})
    if rec.get("op_types"):
        lines.append(f"- quantized only {', '.join(rec['op_types'])} (the rest stays float)")
    kept = rec.get("kept_float") or []
    if kept:
        lines.append(f"- kept in float to meet the gate: {', '.join(kept)}")
    lines += [
        "",
        "| output | cosine mean | cosine min | max abs err | top-1 agreement | mask IoU@0.3 |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in report["outputs"].items():
        agree = f"{m['top1_agreement']:.3f}" if "top1_agreement" in m else "-"
        iou = f"{m['mask_iou']:.3f}" if "mask_iou" in m else "-"
        lines.append(
            f"| {name} | {m['cosine_mean']:.5f} | {m['cosine_min']:.5f} | {m['max_abs_error']:.4g} | {agree} | {iou} |"
        )
    acc = report.get("accuracy")
    if acc:
        lines += [
            "",
            f"Task accuracy: fp32 {acc['reference']:.3f}, {manifest.precision} {acc['candidate']:.3f}",
        ]
    lat = report.get("latency_ms")
    if lat:
        lines += [
            "",
            "| latency p50 (ms, 1 thread) | batch 1 | batch 8 |",
            "|---|---|---|",
            f"| fp32 | {_ms(lat['reference']['batch1'])} | {_ms(lat['reference']['batch8'])} |",
            f"| {manifest.precision} | {_ms(lat['candidate']['batch1'])} | {_ms(lat['candidate']['batch8'])} |",
        ]
    rewrites = report.get("rewrites")
    if rewrites:
        lines += ["", "Rewritten into quantizable ops: " + ", ".join(f"{n} {op}" for op, n in rewrites.items())]
    floats = report.get("float_ops")
    if floats is not None:
        left = ", ".join(f"{op} x{int(t['nodes'])} ({t['ms']:.2f} ms)" for op, t in floats.items()) or "none"
        lines += ["", f"Ops still computing in float (batch 1, 1 thread): {left}"]
    lg = report.get("latency_gate")
    if lg:
        ratio = ", ".join(f"{b.replace('batch', 'batch ')} {r:.2f}x" for b, r in lg["ratios"].items())
        verdict = "slower than fp32" if lg["slower"] else "not slower than fp32"
        scope = "" if lg["applies"] else " (recorded only: not timed on the device's kernels)"
        lines += ["", f"Latency vs fp32: {ratio}: {verdict}{scope}"]
        lines += [f"- responsible: {w}" for w in lg.get("responsible", [])]
    rows = report.get("candidates")
    if rows:
        lines += [
            "",
            "| candidate | gate | batch 1 ms | batch 8 ms | MB | cosine | top-1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            cells = [r["precision"], "pass" if r["passed"] else f"refused: {str(r['refused'])[:80]}",
                     _num(r["batch1_ms"]), _num(r["batch8_ms"]), _num(r["bytes"] and r["bytes"] / 1e6),
                     _num(r["cosine"], 5), _num(r["top1_agreement"], 3)]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        chosen = report.get("chosen") or {}
        lines.append(f"\nShipped {chosen.get('precision')}: {chosen.get('why')}")
    gate = report.get("gate", {})
    lines += [
        "",
        f"Gate: min cosine {gate.get('min_cosine')}, min top-1 agreement {gate.get('min_top1_agreement')},"
        f" max accuracy drop {gate.get('max_accuracy_drop')}: {'PASSED' if gate.get('passed') else 'FAILED'}",
    ]
    lines += [f"- {f}" for f in gate.get("failures", [])]
    return "\n".join(lines) + "\n"
