"""Shadow and A/B figures across a group: each device reports its own experiment (per-version
rows, errors, NaN/Inf, compute time, top-1 histogram, p95; for shadow the row-by-row comparison);
the controller sums what adds up and takes the median of device p95s (percentiles do not add)."""

from __future__ import annotations

import statistics
from typing import Any

from edge_runtime.fleet.db import Rollout
from edge_runtime.fleet.link import DeviceView


def experiment_figures(r: Rollout, devices: list[DeviceView]) -> dict[str, Any]:
    variants: dict[str, dict[str, Any]] = {}
    shadow: dict[str, Any] = {}
    per_device = {}
    p95s: dict[str, list[float]] = {}
    for v in devices:
        exp = v.model(r.name).experiment
        if exp is None or exp.variant != r.version or exp.kind.value != r.strategy:
            continue
        per_device[v.id] = exp.model_dump(mode="json")
        for ver, s in exp.variants.items():
            agg = variants.setdefault(
                ver,
                {
                    "devices": 0,
                    "rows": 0,
                    "errors": 0,
                    "nonfinite": 0,
                    "top1": {},
                    "compute_s": 0.0,
                    "batches": 0,
                    "mean_sum": 0.0,
                    "mean_n": 0,
                },
            )
            agg["devices"] += 1
            for k in ("rows", "errors", "nonfinite", "batches", "mean_n", "compute_s", "mean_sum"):
                agg[k] += getattr(s, k)
            for cls, n in s.top1.items():
                agg["top1"][cls] = agg["top1"].get(cls, 0) + n
            if s.p95_ms is not None:
                p95s.setdefault(ver, []).append(s.p95_ms)
        if exp.shadow is not None:
            for k, val in exp.shadow.model_dump().items():
                if k == "max_abs_diff":
                    shadow[k] = max(shadow.get(k, 0.0), float(val))
                elif val is not None and k not in ("top1_agreement", "mean_abs_diff"):
                    shadow[k] = shadow.get(k, 0) + val
    for ver, agg in variants.items():
        rows = agg["rows"]
        agg["error_rate"] = (agg["errors"] + agg["nonfinite"]) / rows if rows else None
        agg["mean_compute_ms"] = agg["compute_s"] / agg["batches"] * 1000 if agg["batches"] else None
        agg["p95_ms_median_of_devices"] = statistics.median(p95s[ver]) if p95s.get(ver) else None
        agg["mean_output"] = agg["mean_sum"] / agg["mean_n"] if agg["mean_n"] else None
        total = sum(agg["top1"].values())
        agg["top1_share"] = {c: n / total for c, n in sorted(agg["top1"].items())} if total else {}
    if shadow:
        shadow["top1_agreement"] = shadow["agree_top1"] / shadow["classified"] if shadow.get("classified") else None
        n = shadow.get("abs_diff_n", 0)
        shadow["mean_abs_diff"] = shadow.get("abs_diff_sum", 0.0) / n if n else None
    return {
        "kind": r.strategy,
        "served": r.from_version,
        "variant": r.version,
        "devices_reporting": len(per_device),
        "variants": variants,
        "shadow": shadow or None,
        "devices": per_device,
    }


def brief(figures: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for ver, agg in figures.get("variants", {}).items():
        out[ver] = {k: agg.get(k) for k in ("rows", "error_rate", "p95_ms_median_of_devices")}
    if figures.get("shadow"):
        out["top1_agreement"] = figures["shadow"].get("top1_agreement")
    return out
