"""`edgert pack` for ONNX artifacts (x86-cpu, arm64-cpu, jetson-gpu): prepare -> calibrate and
quantize (static QDQ per-channel, or dynamic by op mix; or fp16/fp32) -> validate against fp32
-> gate, with the recovery ladder (quantize only compute ops, then keep the most sensitive nodes
in float) -> the shared finish (flow.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console

from edge_runtime.contracts.targets import host_lacks
from edge_runtime.pack.bias_correction import correct_biases
from edge_runtime.pack.flow import finish, load_held_out, prepare_onnx, progress_bar, record_gate, refuse_if_failed
from edge_runtime.pack.input_stats import input_stats
from edge_runtime.pack.judge import choose
from edge_runtime.pack.op_costs import float_ops, op_times, responsible
from edge_runtime.pack.prepare import compact
from edge_runtime.pack.quantize import (
    COMPUTE_OPS,
    CONV_OPS,
    MATMUL_OPS,
    QuantSettings,
    calibration_cosine,
    choose_mode,
    convert_fp16,
    quantize_int8,
)
from edge_runtime.pack.request import PackError, PackRequest, PackResult, batching_of
from edge_runtime.pack.rewrites import AFFINE, rewrite_for_int8
from edge_runtime.pack.smoothing import smooth_activations
from edge_runtime.pack.targets import TargetProfile
from edge_runtime.pack.validate import compare, latency_pair, layer_sensitivity, run_all, session

RECOVERY_STEPS = (1, 2, 4, 8, 16)
BIAS_SAMPLES = 32  # calibration samples bias correction measures on (DBNet: ~30 s on 2 cores)
BIAS_TOLERANCE = 0.005  # calibration cosine a bias correction may lose and still be kept (same samples)
BIAS_TOLERANCE_HELD_OUT = 0.0005  # ... judged on calibration samples it was not measured on
BIAS_JUDGE_MIN = 8  # calibration samples set aside to judge it on, at least
# A candidate is "slower" than fp32 beyond this share: the run-to-run spread of the p50s measured
# here is about 5%, so a candidate at parity is not refused by noise.
LATENCY_MARGIN = 0.10
# ... and by more than this many ms: on a tiny model (an MLP at 0.05 ms) the ratio is timer noise
# (measured: 1.42x on a 0.02 ms difference on a loaded machine).
LATENCY_FLOOR_MS = 0.1


def pack_onnx(req: PackRequest, profile: TargetProfile, tmp: Path, console: Console, cwd: Path) -> PackResult:
    judge = choose(req.judge, profile)
    if req.smooth_activations is not None and not 0 < req.smooth_activations < 1:
        raise PackError(f"--smooth-activations takes an alpha between 0 and 1 (e.g. 0.5), got {req.smooth_activations}")
    console.log(f"preparing {req.model.name} for {profile.name} ({profile.description})")
    prep = prepare_onnx(req, tmp)
    for note in prep.notes:
        console.log(f"  {note}")
    blocked = profile.unsupported(prep.ops)
    if blocked:
        raise PackError(f"target {profile.name} cannot run ops {blocked} ({profile.unsupported_source})")

    if req.precision == "int8" and not (CONV_OPS | MATMUL_OPS) & prep.ops.keys():
        raise PackError(
            f"nothing in this model quantizes to INT8: it has no {', '.join(sorted(CONV_OPS | MATMUL_OPS))} "
            f"(its ops: {', '.join(list(prep.ops)[:12])}); an INT8 bundle would only add Quantize/Dequantize "
            "pairs. Pack it with --precision fp32 (or fp16 for jetson-gpu)"
        )
    calib, evals = load_held_out(req, prep.inputs, console)
    output_names = [o.name for o in prep.outputs]
    input_names = [i.name for i in prep.inputs]
    with console.status(f"running the fp32 model on {len(evals)} held-out samples"):
        reference = run_all(session(prep.path), evals, output_names)

    candidate = tmp / "model.onnx"
    mode = choose_mode(prep.ops, profile) if req.precision == "int8" else "none"
    # The graphs INT8 is quantized from: the rewritten one (exact Conv folds and hard-sigmoid
    # forms) and, where the hard-sigmoid rewrite did anything, the one with the Conv folds only
    # (the rewrite adds Q/DQ steps, which can cost accuracy; _quantize_best keeps the closer).
    graphs, rewrites, folds_only = [prep.path], {}, {}
    if mode == "static":
        rewrites = rewrite_for_int8(prep.path, tmp / "rewritten.onnx")
        if rewrites:
            console.log(f"  rewrote {', '.join(f'{n} {op}' for op, n in rewrites.items())} into quantizable ops")
            folds_only = {k: v for k, v in rewrites.items() if k == AFFINE}
            graphs = [tmp / "rewritten.onnx"]
            if folds_only != rewrites:
                alt = tmp / "folded.onnx"
                graphs.append(alt if rewrite_for_int8(prep.path, alt, hard_sigmoid=False) else prep.path)
    smoothing: dict[str, Any] | None = None
    if req.smooth_activations is not None and req.precision == "int8":
        if mode != "static":
            raise PackError("--smooth-activations needs static INT8; this model is quantized dynamically (MatMul ops)")
        pairs = 0
        for i, graph in enumerate(list(graphs)):
            smoothed = tmp / f"smoothed{i}.onnx"
            pairs = smooth_activations(graph, smoothed, calib, req.smooth_activations)
            if pairs:
                graphs[i] = smoothed
        smoothing = {"alpha": req.smooth_activations, "pairs": pairs}
        console.log(f"  smoothed activations of {pairs} Conv pairs (alpha {req.smooth_activations})")

    def build(exclude: list[str], op_types: list[str] | None = None) -> tuple[QuantSettings, dict[str, Any]]:
        if req.precision == "int8":
            assert mode != "none"
            progress = progress_bar(console)
            on_sample = None
            with progress or nullcontext():
                if progress is not None:
                    task = progress.add_task(f"calibrating ({req.calibration})", total=len(calib))
                    on_sample = lambda: progress.advance(task)  # noqa: E731
                settings = _quantize_best(
                    req, profile, mode, graphs, prep.path, candidate, calib, exclude, on_sample, op_types,
                )  # fmt: skip
            settings.smoothing = smoothing
            bc = settings.bias_correction
            if bc:
                cos = bc["calibration_cosine"]
                console.log(f"  bias correction of {bc['layers']} layers: calibration cosine {cos['before']:.4f} -> "
                            f"{cos['after']:.4f}, {'kept' if bc['kept'] else 'not kept'}")  # fmt: skip
        elif req.precision == "fp16":
            settings = convert_fp16(prep.path, candidate)
        else:
            shutil.copyfile(prep.path, candidate)
            settings = QuantSettings(mode="none", precision="fp32")
        if judge.where == "aarch64":
            outputs = judge.run(candidate.read_bytes(), "onnxruntime", evals, input_names, console)
        else:
            with console.status(f"validating the candidate against fp32 on {len(evals)} held-out samples"):
                outputs = run_all(session(candidate, exact=profile.validate_exact), evals, output_names)
        return settings, compare(reference, outputs, output_names, evals, req.labels)

    settings, report = build([])
    failures = req.gate.check(report)
    attempts: list[dict[str, Any]] = [{"op_types": "all", "kept_float": [], "failures": failures}]
    if failures and req.precision == "int8" and req.recover:
        # Recovery ladder: (1) quantize only the compute ops; (2) also keep the quantized
        # nodes that add the most measured error (on calibration data) in float.
        console.log(f"gate failed: {'; '.join(failures)}; trying to recover")
        settings, report = build([], COMPUTE_OPS)
        failures = req.gate.check(report)
        attempts.append({"op_types": COMPUTE_OPS, "kept_float": [], "failures": failures})
        console.log(f"  quantizing only {', '.join(COMPUTE_OPS)}: {'pass' if not failures else 'fail'}")
        if failures:
            with console.status("ranking quantized nodes by the error each adds"):
                ranked = layer_sensitivity(prep.path, candidate, calib[:8], COMPUTE_OPS)
            for k in RECOVERY_STEPS:
                exclude = [n for n, _ in ranked[:k]]
                settings, report = build(exclude, COMPUTE_OPS)
                failures = req.gate.check(report)
                attempts.append({"op_types": COMPUTE_OPS, "kept_float": exclude, "failures": failures})
                console.log(f"  keeping {k} most sensitive nodes in float: {'pass' if not failures else 'fail'}")
                if not failures:
                    break
    record_gate(req, report, failures)
    report["recovery"] = {
        "attempts": attempts,
        "kept_float": settings.excluded_nodes,
        "op_types": settings.op_types,
    }
    host_kernels = (
        "exact Q/DQ arithmetic (x86, graph optimizations off)" if profile.validate_exact else "this host's kernels"
    )
    report["judged_on"] = judge.describe(host_kernels)
    report["validated_with"] = report["judged_on"]["kernels"]
    shipped, reference_file = tmp / "shipped.onnx", tmp / "reference.onnx"
    compact(candidate, shipped)
    compact(prep.path, reference_file)  # the fp32 baseline gets the same treatment
    ref_size, cand_size = reference_file.stat().st_size, shipped.stat().st_size
    ref_gz, cand_gz = (len(gzip.compress(p.read_bytes(), 6)) for p in (reference_file, shipped))
    report["size"] = {
        "reference_bytes": ref_size,
        "candidate_bytes": cand_size,
        "ratio": ref_size / cand_size,
        "reference_gzip_bytes": ref_gz,
        "candidate_gzip_bytes": cand_gz,
        "gzip_ratio": ref_gz / cand_gz,
    }
    refuse_if_failed(report, failures)

    console.log("measuring latency (1 thread, batch 1 and 8) and where it goes")
    report["latency_ms"] = {"reference": {}, "candidate": {}}
    ref_s, cand_s = session(prep.path, 1), session(candidate, 1)
    for b in (1, 8):
        pair = latency_pair(ref_s, cand_s, evals, b)
        report["latency_ms"]["reference"][f"batch{b}"], report["latency_ms"]["candidate"][f"batch{b}"] = pair
    if settings.rewritten is False:  # calibrated both ways; the graph without hard-sigmoid forms came out closer
        rewrites = folds_only
    report["rewrites"] = rewrites
    if req.precision != "fp32":  # an fp32 candidate is the reference: nothing to explain or gate
        costs = {"reference": op_times(prep.path, evals[0]), "candidate": op_times(candidate, evals[0])}
        report["op_costs_ms"] = costs
        if req.precision == "int8":
            report["float_ops"] = float_ops(costs["candidate"])
        _latency_gate(req, profile, report, costs)
    batching = batching_of(prep.inputs, prep.outputs, req.stateful)
    if profile.batch_profile and batching["batchable"]:
        batching["profile"] = profile.batch_profile
    fields: dict[str, Any] = {
        "name": req.name,
        "version": req.version,
        "target": profile.name,
        "runtime": profile.runtime,
        "model": "model.onnx",
        "inputs": [i.model_dump() for i in prep.inputs],
        "outputs": [o.model_dump() for o in prep.outputs],
        "preprocess": req.preprocess.model_dump() if req.preprocess else None,
        "labels": req.labels,
        "precision": req.precision,
        "quantization": {
            **settings.as_manifest(),
            "preparation": prep.notes,
            "ops": prep.ops,
            "rewrites": rewrites,
            "input_stats": input_stats(calib, req.preprocess.layout if req.preprocess else None),
        },
        "validation": report,
        "runtime_options": {"providers": profile.providers, "provider_options": _provider_options(profile, req)},
        "batching": batching,
        "source_sha256": hashlib.sha256(req.model.read_bytes()).hexdigest(),
        "key_id": "",
    }
    files: dict[str, bytes] = {"model.onnx": shipped.read_bytes()}
    if req.preprocess is None:
        # No image spec to build a warm-up tensor from (audio, state, scalars such as
        # silero's sample rate): ship a real held-out sample to warm up with.
        warmup = io.BytesIO()
        np.savez(warmup, **evals[0].feeds)  # type: ignore[arg-type]
        files["warmup.npz"] = warmup.getvalue()
        batching["warmup"] = "warmup.npz"
    return finish(req, fields, files, report, cwd, console)


def _host_has_vnni() -> bool:
    # x86-vnni's own CPU requirement (targets.toml); a CPU whose flags cannot be read counts as having
    # it, so the 8-bit variant, which such a host could not judge, is not tried there.
    return host_lacks("x86-vnni") is None


def _quantize_best(
    req: PackRequest,
    profile: TargetProfile,
    mode: Literal["static", "dynamic"],
    graphs: list[Path],
    fp32: Path,
    candidate: Path,
    calib: list[Any],
    exclude: list[str],
    on_sample: Any,
    op_types: list[str] | None,
) -> QuantSettings:
    """With ``--calibration auto``, more than one way to quantize is tried and the one closest to
    fp32 on the calibration samples (never the held-out ones) is kept:

    - the rewritten graph and the one with only the exact Conv folds: the hard-sigmoid rewrite
      makes it quantizable (faster on some models, needed by NPUs) but adds Q/DQ steps, which
      can cost accuracy (DBNet, before the Conv folds);
    - 7-bit weights (``reduce_range``, the x86-cpu default: AVX2 without VNNI saturates 8-bit
      U8S8 products; PP-OCR cls fell to cosine 0.87 without it) and 8-bit ones, but only where
      this host lacks VNNI, so its own kernels show any saturation a device would have;
    - per graph, both activation estimators (``quantize_int8``'s auto).

    Ties keep the earlier variant (rewritten graph, the profile's own settings). The kept variant
    is then bias-corrected (``_bias_correct``)."""
    if req.calibration != "auto" or mode != "static":
        settings = quantize_int8(graphs[0], candidate, calib, profile, mode, req.calibration, exclude, on_sample,
                                 op_types)  # fmt: skip
        if mode == "static" and req.bias_correction:
            _bias_correct(graphs[0], candidate, calib, settings)
        return settings
    profiles = [profile]
    if profile.reduce_range and not _host_has_vnni():
        profiles.append(profile.model_copy(update={"reduce_range": False}))
    best: tuple[float, Path, QuantSettings, Path] | None = None
    tried: dict[str, float] = {}
    for g, graph in enumerate(graphs):
        for prof in profiles:
            out = candidate.with_suffix(f".g{g}r{int(prof.reduce_range)}.onnx")
            got = quantize_int8(graph, out, calib, prof, mode, "auto", exclude, on_sample, op_types)
            # The kept estimator's score, measured already (against this graph's own fp32: the
            # rewrite is exact, so against the original's to within 1e-7).
            score = max((got.calibration_scores or {}).values())
            got.rewritten = g == 0 if len(graphs) > 1 else None
            graph_label = "rewritten" if g == 0 and len(graphs) > 1 else "original"
            bits = "7-bit weights" if prof.reduce_range else "8-bit weights"
            for method, value in (got.calibration_scores or {}).items():
                tried[f"{graph_label} graph, {method}, {bits}"] = value
            if best is None or score > best[0] + 1e-4:
                best = (score, out, got, graph)
    assert best is not None
    best[1].replace(candidate)
    for leftover in candidate.parent.glob(candidate.stem + ".g*.onnx"):
        leftover.unlink(missing_ok=True)
    best[2].calibration_scores = tried
    if req.bias_correction:
        _bias_correct(best[3], candidate, calib, best[2], before=best[0])
    return best[2]


def _bias_correct(graph: Path, candidate: Path, calib: list[Any], settings: QuantSettings,
                  before: float | None = None) -> None:  # fmt: skip
    """Correct the candidate's layer biases for the mean error quantization adds (on up to
    BIAS_SAMPLES calibration samples), as NNCF does by default; the held-out gate then judges the
    result like any candidate. Whether it is kept is judged on calibration samples it was not
    measured on (``bias_split``): kept unless their cosine falls by more than BIAS_TOLERANCE_HELD_OUT
    (on the same samples, when too few to spare, by more than BIAS_TOLERANCE). Judged in sample, a
    correction on PP-OCR cls (x86-vnni) was kept that took the held-out cosine 0.991 -> 0.979.
    Measured on DBNet (x86-cpu, 7-bit weights): held-out cosine 0.920 -> 0.978, mask IoU 0.834 -> 0.942."""
    fixed = candidate.with_suffix(".bc.onnx")
    measure, judge = bias_split(calib)
    layers = correct_biases(graph, candidate, [s.feeds for s in measure], fixed)
    out_of_sample = judge is not measure
    if before is None or out_of_sample:
        before = calibration_cosine(graph, candidate, judge)
    after = calibration_cosine(graph, fixed, judge) if layers else before
    kept = layers > 0 and after > before - (BIAS_TOLERANCE_HELD_OUT if out_of_sample else BIAS_TOLERANCE)
    if kept:
        fixed.replace(candidate)
    fixed.unlink(missing_ok=True)
    settings.bias_correction = {"layers": layers, "samples": len(measure), "judged_on": len(judge),
                                "judged_out_of_sample": out_of_sample, "calibration_cosine": {
                                "before": round(before, 6), "after": round(after, 6)}, "kept": kept}  # fmt: skip


def bias_split(calib: list[Any]) -> tuple[list[Any], list[Any]]:
    """(samples bias correction measures on, samples its result is judged on). A correction
    measured on some samples always looks better on those same samples, so it is judged on the
    calibration samples it did not see, as long as there are enough to spare (a third, at least
    BIAS_JUDGE_MIN); with fewer it is judged on the same ones (the held-out gate judges it anyway)."""
    spare = max(BIAS_JUDGE_MIN, len(calib) // 3)
    if len(calib) < 2 * spare:
        return calib[:BIAS_SAMPLES], calib[:BIAS_SAMPLES]
    return calib[: min(BIAS_SAMPLES, len(calib) - spare)], calib[-spare:]


def _latency_gate(
    req: PackRequest, profile: TargetProfile, report: dict[str, Any], costs: dict[str, dict[str, Any]]
) -> None:
    """Refuse a candidate slower than fp32 where this host's kernels are the device's (x86-cpu);
    ARM and GPU targets are only recorded (timed on x86 or under emulation: not the device's speed)."""
    lat = report["latency_ms"]
    ratios, extra = {}, {}
    for b in ("batch1", "batch8"):
        ref, cand = lat["reference"].get(b), lat["candidate"].get(b)
        if ref and cand:
            ratios[b] = cand["p50"] / ref["p50"]
            extra[b] = cand["p50"] - ref["p50"]
    slower = {b: r for b, r in ratios.items() if r > 1 + LATENCY_MARGIN and extra[b] > LATENCY_FLOOR_MS}
    timed_here = profile.judge_arch is None
    why = responsible(costs["reference"], costs["candidate"]) if slower else []
    applies = timed_here
    report["latency_gate"] = {"ratios": ratios, "extra_ms": extra, "margin": LATENCY_MARGIN,
                              "floor_ms": LATENCY_FLOOR_MS, "applies": applies, "allow_slower": req.allow_slower,
                              "slower": bool(slower), "responsible": why}  # fmt: skip
    if slower and applies and not req.allow_slower:
        worst = ", ".join(f"{r:.2f}x at {b.replace('batch', 'batch ')}" for b, r in slower.items())
        raise PackError(
            f"the {req.precision} candidate is slower than fp32 ({worst}; measured here, 1 thread); "
            f"responsible: {'; '.join(why) or 'no single op'}. Pass --allow-slower to ship it anyway, or "
            "--precision auto to ship the fastest candidate that passes the gate (no bundle written)",
            report,
        )


def _provider_options(profile: TargetProfile, req: PackRequest) -> dict[str, dict[str, Any]]:
    """The target's provider options for this artifact: TensorRT's INT8 mode only for a Q/DQ
    INT8 graph (an FP16 variant without Q/DQ would make TensorRT ask for a calibration table)."""
    options = {k: dict(v) for k, v in profile.provider_options.items()}
    trt = options.get("TensorrtExecutionProvider")
    if trt is not None and req.precision != "int8":
        trt["trt_int8_enable"] = False
        trt["trt_fp16_enable"] = req.precision == "fp16"
    return options
