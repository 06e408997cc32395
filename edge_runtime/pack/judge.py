"""Which CPU's kernels judge a candidate: this host's, or aarch64's under emulation.

An ARM target's INT8 artifact computes differently on x86: ONNX Runtime fuses Q/DQ pairs into
x86's U8S8 kernels (which saturate without VNNI), or, with graph optimizations off, computes each
pair exactly, which is close to but not what the ARM kernels do. ``--judge aarch64`` runs the
candidate through the device's own backend on aarch64 code (pack/emulation.py) so the report's
figures are what an ARM device computes. ``auto`` (the default) does so for targets that run on
ARM (``judge_arch`` in targets.toml) whenever the emulation environment is present, else judges
here and says why in the report. ``EDGERT_JUDGE`` (auto|host|aarch64) overrides ``auto``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console

from edge_runtime.contracts.targets import host_lacks
from edge_runtime.pack import emulation
from edge_runtime.pack.datasets import Sample
from edge_runtime.pack.request import PackError
from edge_runtime.pack.targets import TargetProfile

JUDGES = ("auto", "host", "aarch64")


@dataclass
class Judge:
    where: str  # "host" | "aarch64"
    why: str  # how it was chosen (the report says it)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def run(
        self, model: bytes, runtime: str, samples: list[Sample], names: list[str], console: Console
    ) -> list[list[np.ndarray]]:
        """Outputs of the candidate on every sample, computed on aarch64 (only call when where == aarch64)."""
        assert self.where == "aarch64"
        t0 = time.perf_counter()
        with console.status(f"judging on aarch64 kernels under emulation ({len(samples)} samples; slow)"):
            try:
                got = emulation.run_on_aarch64(model, runtime, [s.feeds for s in samples], names)
            except emulation.EmulationError as e:
                raise PackError(f"--judge aarch64: {e}") from e
        self.runs.append({"machine": got.machine, "runtime": got.runtime, "how": got.how,
                          "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        return got.outputs

    def describe(self, host_kernels: str) -> dict[str, Any]:
        if self.where == "host":
            return {"where": "host", "kernels": host_kernels, "why": self.why}
        last = self.runs[-1] if self.runs else {}
        return {"where": "aarch64", "kernels": f"{last.get('runtime', '?')} on {last.get('machine', '?')}",
                "how": last.get("how"), "why": self.why, "runs": self.runs}  # fmt: skip


def choose(requested: str, profile: TargetProfile) -> Judge:
    explicit = requested != "auto"
    if not explicit:
        requested = os.environ.get("EDGERT_JUDGE", "auto")
    if requested not in JUDGES:
        what = "--judge" if explicit else "EDGERT_JUDGE"
        raise PackError(f"{what} {requested!r}: expected one of {', '.join(JUDGES)}")
    if requested == "host":
        return Judge("host", "asked (--judge host)" if explicit else "asked (EDGERT_JUDGE=host)")
    if profile.judge_arch is None:
        if explicit:
            raise PackError(f"--judge aarch64: target {profile.name} runs on x86 kernels; judge it here (--judge host)")
        lacks = host_lacks(profile.name)
        if lacks:  # e.g. x86-vnni packed on a CPU without VNNI: its kernels saturate 8-bit weights
            return Judge("host", f"{lacks}: judged on this host's kernels anyway, a pessimistic figure")
        return Judge("host", f"target {profile.name} runs on this kind of CPU")
    why = emulation.problem()
    if requested == "aarch64":
        if why:
            raise PackError(f"--judge aarch64: {why}")
        return Judge("aarch64", "asked (--judge aarch64)" if explicit else "asked (EDGERT_JUDGE=aarch64)")
    if why:
        return Judge("host", f"aarch64 emulation not available: {why}")
    return Judge("aarch64", "auto: the arm64 emulation environment is present")
