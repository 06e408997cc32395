"""Latency verdicts under a CPU hog: how often does the health window roll back a version that is
identical to the old one, and how often does it catch one that is 3x slower? Table + PNG.

Each rollout: the old version serves steady traffic, then the new one is activated through the
device's real Updater (store, runtime, health window) while a CPU hog (busy processes, one per
core) starts exactly when the window starts: the worst case for a verdict that compares the new
version's window with the old version's figures from before. For every window the benchmark also
computes what that earlier, unpaired rule would have said (new p95 over the window / old p95
before it, same limits), from the same run.

    python bench/bench_verdict.py [--rollouts 20] [--window 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edge_runtime.contracts.bundle import generate_keypair, load_public_keys  # noqa: E402
from edge_runtime.contracts.fleet import HealthPolicy, UpdateOutcome  # noqa: E402
from edge_runtime.device.agent.updater import Updater  # noqa: E402
from edge_runtime.serving.runtime import Runtime  # noqa: E402
from edge_runtime.serving.store import ModelStore  # noqa: E402
from tests.fleet_models import inputs, make_bundle  # noqa: E402

OUT = REPO / "bench" / "results"


def _spin(stop: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


class Hog:
    def __init__(self, procs: int) -> None:
        self.stop = multiprocessing.Event()
        self.procs = [multiprocessing.Process(target=_spin, args=(self.stop,), daemon=True) for _ in range(procs)]

    def __enter__(self) -> Hog:
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(5)


def traffic(rt: Runtime, stop: threading.Event, rate_hz: float = 50.0) -> None:
    x = inputs(64)
    i = 0
    while not stop.is_set():
        with contextlib.suppress(Exception):  # a failing version is the window's business, not the load's
            rt.infer("cls", {"x": x[i % 64 : i % 64 + 1]}, timeout_ms=5000)
        i += 1
        time.sleep(1.0 / rate_hz)


def one_rollout(tmp: Path, variant: str, index: int, window: float, hog_procs: int) -> dict[str, object]:
    keys = tmp / "keys"
    state = tmp / f"state-{variant}-{index}"
    store = ModelStore(state)
    store.trust(keys / "signing.pub")
    # A model of ~3 ms (700 extra loop iterations, same answers); "3x slower" runs 2160 more.
    old = make_bundle(tmp / f"old-{index}.edgepkg", keys / "signing.key", "1.0.0", "loop700")
    new = make_bundle(tmp / f"new-{variant}-{index}.edgepkg", keys / "signing.key", "1.1.0",
                      "loop700" if variant == "identical" else "loop2160")  # fmt: skip
    store.install(old)
    rt = Runtime(load_public_keys([keys / "signing.pub"]), threads=1, spin=False)
    rt.load(store.bundle_path("cls", "1.0.0"))
    updater = Updater(store, rt, lambda: load_public_keys([keys / "signing.pub"]), "x86-cpu")
    stop = threading.Event()
    t = threading.Thread(target=traffic, args=(rt, stop), daemon=True)
    t.start()
    time.sleep(1.5)  # the old version's figures, before the update, on a quiet machine
    old_p95 = rt.get("cls").current.stats.p95() or 0.0
    updater.stage("cls", "1.1.0", new, downgrade=False)
    policy = HealthPolicy(window_s=window, min_inferences=20, max_p95_ratio=2.0, min_p95_increase_ms=0.2)
    with Hog(hog_procs):  # the machine gets busy exactly when the window starts
        result = updater.activate_and_watch("cls", "1.1.0", policy)
    new_stats = rt.get("cls").current.stats if result.outcome is UpdateOutcome.COMMITTED else None
    stop.set()
    t.join(10)
    figures = result.figures
    # What the unpaired rule (before) would have said on this very window.
    new_p95 = new_stats.p95() if new_stats is not None else None
    if new_p95 is None:  # rolled back: the new version's stats are gone with it; use the window figures
        snap = (figures.get("new") or {}) if isinstance(figures.get("new"), dict) else {}
        new_p95 = (snap.get("p95_ms") or 0.0) / 1000
    unpaired_ratio = new_p95 / old_p95 if old_p95 else float("nan")
    unpaired_slow = unpaired_ratio > policy.max_p95_ratio and (new_p95 - old_p95) * 1000 > policy.min_p95_increase_ms
    rt.close()
    return {
        "variant": variant,
        "rolled_back": result.outcome is not UpdateOutcome.COMMITTED,
        "reason": result.reason,
        "paired_ratio": figures.get("p95_ratio"),
        "pairs": figures.get("latency_pairs"),
        "sign_test_p": figures.get("sign_test_p"),
        "unpaired_ratio": unpaired_ratio,
        "unpaired_would_roll_back": bool(unpaired_slow),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rollouts", type=int, default=20)
    ap.add_argument("--window", type=float, default=3.0)
    ap.add_argument("--hog", type=int, default=os.cpu_count() or 2, help="busy processes during each window")
    args = ap.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        generate_keypair(tmp / "keys")
        for i in range(args.rollouts):
            for variant in ("identical", "3x slower"):
                r = one_rollout(tmp, variant, i, args.window, args.hog)
                rows.append(r)
                print(f"{i + 1:2d} {variant:10s} rolled back: {r['rolled_back']!s:5s} paired ratio "
                      f"{r['paired_ratio'] or float('nan'):.2f} ({r['pairs']} pairs)  unpaired ratio "
                      f"{r['unpaired_ratio']:.2f} -> would roll back: {r['unpaired_would_roll_back']}",
                      flush=True)  # fmt: skip
    summary = {}
    for variant in ("identical", "3x slower"):
        sel = [r for r in rows if r["variant"] == variant]
        summary[variant] = {
            "rollouts": len(sel),
            "rolled_back_paired": sum(bool(r["rolled_back"]) for r in sel),
            "rolled_back_unpaired_rule": sum(bool(r["unpaired_would_roll_back"]) for r in sel),
            "median_paired_ratio": float(np.nanmedian([float(r["paired_ratio"] or np.nan) for r in sel])),
            "median_unpaired_ratio": float(np.nanmedian([float(r["unpaired_ratio"]) for r in sel])),  # type: ignore[arg-type]
        }
    OUT.mkdir(exist_ok=True)
    (OUT / "verdict.json").write_text(json.dumps({"hog_processes": args.hog, "window_s": args.window,
                                                  "summary": summary, "rollouts": rows}, indent=2))  # fmt: skip
    print()
    print(f"CPU hog of {args.hog} busy processes from the start of each {args.window:g} s window")
    print("new version | rollouts | rolled back (paired, now) | would roll back (unpaired, before) | "
          "median ratio paired | median ratio unpaired")  # fmt: skip
    for variant, s in summary.items():
        print(f"{variant} | {s['rollouts']} | {s['rolled_back_paired']} | {s['rolled_back_unpaired_rule']} | "
              f"{s['median_paired_ratio']:.2f} | {s['median_unpaired_ratio']:.2f}")  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for j, variant in enumerate(("identical", "3x slower")):
        sel = [r for r in rows if r["variant"] == variant]
        ax.scatter([j - 0.1] * len(sel), [r["paired_ratio"] or np.nan for r in sel], label=f"{variant}: paired",
                   marker="o")  # fmt: skip
        ax.scatter([j + 0.1] * len(sel), [r["unpaired_ratio"] for r in sel], label=f"{variant}: unpaired",
                   marker="x")  # fmt: skip
    ax.axhline(2.0, color="grey", linestyle="--", label="limit (2x)")
    ax.set_xticks([0, 1], ["identical", "3x slower"])
    ax.set_ylabel("p95 new / old")
    ax.set_yscale("log")
    ax.set_title("latency verdict under a CPU hog: paired vs unpaired")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "verdict.png", dpi=100)


if __name__ == "__main__":
    main()
