"""Compare a candidate artifact with the fp32 original on held-out data, and gate it.

Metrics per output: cosine similarity (mean and worst sample), max/mean absolute error,
top-1 agreement for classifier-like outputs ([N, C], C > 1), and task accuracy of both
models when ground truth is given. Latency at batch 1 and 8 on one thread, for both, interleaved.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.pack.datasets import Sample
from edge_runtime.pack.graph_index import exposing


@dataclass(frozen=True)
class Gate:
    min_cosine: float = 0.98
    min_top1_agreement: float = 0.95
    max_accuracy_drop: float = 0.02

    def check(self, report: dict[str, Any]) -> list[str]:
        """Reasons the report fails this gate; empty when it passes."""
        failures = []
        for name, m in report["outputs"].items():
            if m["cosine_mean"] < self.min_cosine:
                failures.append(f"output {name!r}: mean cosine {m['cosine_mean']:.4f} < {self.min_cosine}")
            agree = m.get("top1_agreement")
            if agree is not None and agree < self.min_top1_agreement:
                failures.append(f"output {name!r}: top-1 agreement {agree:.3f} < {self.min_top1_agreement}")
        acc = report.get("accuracy")
        if acc and acc["drop"] > self.max_accuracy_drop:
            failures.append(
                f"task accuracy dropped {acc['drop']:.3f} ({acc['reference']:.3f} -> {acc['candidate']:.3f}),"
                f" more than --max-drop {self.max_accuracy_drop}"
            )
        return failures


def session(path: Path | bytes, threads: int = 1, exact: bool = False) -> Any:
    """A CPU session. ``exact`` turns graph optimizations off, so Q/DQ pairs are not fused
    into this host's integer kernels and each is computed exactly: the reference for
    artifacts whose device kernels (ARM, TensorRT) differ from x86's saturating U8S8 path."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    model = str(path) if isinstance(path, Path) else path
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run_all(sess: Any, samples: list[Sample], output_names: list[str] | None = None) -> list[list[np.ndarray]]:
    return [sess.run(output_names, s.feeds) for s in samples]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def compare(
    reference: list[list[np.ndarray]],
    candidate: list[list[np.ndarray]],
    output_names: list[str],
    samples: list[Sample],
    labels: list[str] | None,
) -> dict[str, Any]:
    outputs: dict[str, Any] = {}
    for k, name in enumerate(output_names):
        ref = [r[k] for r in reference]
        cand = [c[k] for c in candidate]
        cos = [cosine(a, b) for a, b in zip(ref, cand, strict=True)]
        diff = [np.abs(a.astype(np.float64) - b.astype(np.float64)) for a, b in zip(ref, cand, strict=True)]
        m: dict[str, Any] = {
            "cosine_mean": float(np.mean(cos)),
            "cosine_min": float(np.min(cos)),
            "max_abs_error": float(max(d.max() for d in diff)),
            "mean_abs_error": float(np.mean([d.mean() for d in diff])),
            "nonfinite": int(sum(int((~np.isfinite(c)).sum()) for c in cand)),
        }
        # (within 1e-5: the prepared fp32 graph's fused sigmoid can give 1.0000001)
        if ref[0].ndim == 4 and ref[0].shape[1] == 1 and all(a.min() >= -1e-5 and a.max() <= 1 + 1e-5 for a in ref):
            # A probability map (segmentation, DBNet text detection): IoU of the masks at 0.3,
            # the binarization threshold DBNet's post-processing uses.
            inter = sum(int(((a > 0.3) & (b > 0.3)).sum()) for a, b in zip(ref, cand, strict=True))
            union = sum(int(((a > 0.3) | (b > 0.3)).sum()) for a, b in zip(ref, cand, strict=True))
            m["mask_iou"] = inter / union if union else 1.0
        if ref[0].ndim == 2 and ref[0].shape[1] > 1:
            ra = np.concatenate([a.argmax(1) for a in ref])
            ca = np.concatenate([b.argmax(1) for b in cand])
            m["top1_agreement"] = float((ra == ca).mean())
        outputs[name] = m
    report: dict[str, Any] = {"samples": len(samples), "outputs": outputs}
    truth = [s.label for s in samples]
    first = output_names[0]
    if labels and all(t is not None for t in truth) and "top1_agreement" in outputs[first]:
        index = {lab: i for i, lab in enumerate(labels)}
        unknown = sorted({t for t in truth if t is not None and t not in index})
        if unknown:
            raise ValueError(f"ground-truth labels {unknown} are not among the model labels {labels}")
        y = np.array([index[t] for t in truth if t is not None])
        acc_ref = float((np.concatenate([r[0].argmax(1) for r in reference]) == y).mean())
        acc_cand = float((np.concatenate([c[0].argmax(1) for c in candidate]) == y).mean())
        report["accuracy"] = {"reference": acc_ref, "candidate": acc_cand, "drop": acc_ref - acc_cand}
    return report


def latency_pair(
    reference: Any, candidate: Any, samples: list[Sample], batch: int, runs: int = 20
) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """p50/mean ms per call of two sessions, interleaved run by run, so that load from elsewhere on
    the machine (a test suite, a build) falls on both alike and their ratio stays honest."""
    feeds = {}
    for name in samples[0].feeds:
        parts = [samples[i % len(samples)].feeds[name] for i in range(batch)]
        feeds[name] = np.concatenate(parts) if parts[0].ndim else parts[0]
    live = []
    for sess in (reference, candidate):
        try:
            sess.run(None, feeds)
            live.append(sess)
        except Exception:
            live.append(None)
    times: list[list[float]] = [[], []]
    deadline = time.perf_counter() + 20.0
    for _ in range(runs):
        for k, sess in enumerate(live):
            if sess is not None:
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times[k].append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() > deadline:
            break
    ref, cand = (
        {"p50": statistics.median(t), "mean": statistics.fmean(t), "runs": len(t)} if t else None for t in times
    )
    return ref, cand


def layer_sensitivity(
    fp32: Path, quantized: Path, samples: list[Sample], op_types: list[str] | None = None
) -> list[tuple[str, float]]:
    """Nodes ranked by how much quantization error they add, measured on real data.

    Both models are made to expose every float tensor that a node produces; the error of a
    node is (1 - cosine) at its output minus the worst (1 - cosine) at its inputs, so a node
    is blamed only for the error it adds, not for what it inherits. Only nodes of op_types
    (the ones that were quantized) are ranked: keeping any other node in float changes nothing.
    """
    import onnx

    ref_model, q_model = onnx.load(str(fp32)), onnx.load(str(quantized))
    q_tensors = {o for n in q_model.graph.node for o in n.output}
    nodes = [n for n in ref_model.graph.node if n.op_type not in ("Constant", "Shape")]
    names = sorted({o for n in nodes for o in n.output if o in q_tensors})
    ref_s = session(exposing(ref_model, names).SerializeToString(), threads=2)
    q_s = session(exposing(q_model, names).SerializeToString(), threads=2)
    errors: dict[str, list[float]] = {t: [] for t in names}
    for s in samples:
        ra = dict(zip(names, ref_s.run(names, s.feeds), strict=True))
        qa = dict(zip(names, q_s.run(names, s.feeds), strict=True))
        for t in names:
            if ra[t].dtype.kind == "f" and ra[t].size:
                errors[t].append(1.0 - cosine(ra[t], qa[t]))
    err = {t: float(np.mean(v)) for t, v in errors.items() if v}
    ranked = []
    for n in nodes:
        if op_types is not None and n.op_type not in op_types:
            continue
        outs = [err[o] for o in n.output if o in err]
        if not outs:
            continue
        ins = [err[i] for i in n.input if i in err]
        ranked.append((n.name, max(outs) - (max(ins) if ins else 0.0)))
    return sorted(ranked, key=lambda x: -x[1])
