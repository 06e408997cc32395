"""The health window's verdict: a new version's live figures against the previous version's on
the same device and traffic: error rate, p95 latency ratio, output drift (total variation
distance of top-1 classes, or relative shift of the mean)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_runtime.contracts.fleet import HealthPolicy, VerdictKind, WindowFigures
from edge_runtime.device.agent.latency_pairs import PairedVerdict
from edge_runtime.serving.stats import VersionStats


@dataclass
class Verdict:
    healthy: bool
    reason: str
    figures: dict[str, object] = field(default_factory=dict)
    kind: VerdictKind = VerdictKind.HEALTHY

    def window_figures(self) -> WindowFigures:
        """The summary that travels with the outcome (the per-version snapshots stay local)."""
        f = self.figures
        return WindowFigures.model_validate({k: f[k] for k in WindowFigures.model_fields if f.get(k) is not None})


def evaluate(
    policy: HealthPolicy, baseline: VersionStats | None, current: VersionStats, paired: PairedVerdict | None = None
) -> Verdict:
    """Errors and NaN/Inf from the new version's own figures; drift against the previous version's
    figures; latency only from paired timings (latency_pairs.py): the two versions on the same
    inputs at the same moments. Without enough pairs latency is not judged."""
    cur = current.snapshot()
    rows = cur.rows
    figures: dict[str, object] = {
        "new": cur.model_dump(),
        "old": baseline.snapshot().model_dump() if baseline else None,
    }
    if rows == 0:
        if policy.min_inferences == 0:  # the policy asked for no traffic: nothing to judge, by design
            return Verdict(True, "no traffic during the window (none required)", figures)
        return Verdict(True, "unjudged: no traffic during the window", figures, VerdictKind.IDLE)
    error_rate = (cur.errors + cur.nonfinite) / rows  # one snapshot: counts and rows from the same moment
    figures["error_rate"] = error_rate
    if cur.errors and cur.errors == rows:
        return Verdict(False, f"every inference failed ({cur.errors} of {rows})", figures, VerdictKind.ERRORS)
    if error_rate > policy.max_error_rate:
        what = "NaN/Inf outputs" if cur.nonfinite >= cur.errors else "failed inferences"
        reason = f"error rate {error_rate:.1%} ({what}) over {policy.max_error_rate:.1%}"
        return Verdict(False, reason, figures, VerdictKind.ERRORS)
    if paired is not None:
        figures["p95_ratio"] = paired.ratio
        figures["p95_increase_ms"] = paired.increase_ms
        figures["paired_p95_new_ms"], figures["paired_p95_old_ms"] = paired.p95_new_ms, paired.p95_old_ms
        figures["latency_pairs"] = paired.pairs
        figures["slower_share"] = paired.slower_share
        figures["sign_test_p"] = paired.p_value
        if paired.slow:
            reason = (
                f"p95 latency {paired.ratio:.1f}x the previous version's in paired runs on the same inputs (limit "
                f"{policy.max_p95_ratio}x): slower in {paired.slower_share:.0%} of {paired.pairs} pairs, "
                f"sign test p={paired.p_value:.1g}"
            )
            return Verdict(False, reason, figures, VerdictKind.LATENCY)
    if baseline is not None and baseline.rows >= policy.min_baseline:
        drift = _drift(baseline, current)
        if drift is not None:
            figures["drift"] = drift
            if drift > policy.max_drift:
                reason = f"output drift {drift:.2f} over {policy.max_drift} against the previous version"
                return Verdict(False, reason, figures, VerdictKind.DRIFT)
    return Verdict(True, "healthy", figures)


def _drift(old: VersionStats, new: VersionStats) -> float | None:
    if sum(old.top1.values()) >= 10 and sum(new.top1.values()) >= 10:
        keys = set(old.top1) | set(new.top1)
        n_old, n_new = sum(old.top1.values()), sum(new.top1.values())
        return 0.5 * sum(abs(old.top1[k] / n_old - new.top1[k] / n_new) for k in keys)
    if old.mean_n and new.mean_n:
        a, b = old.mean_sum / old.mean_n, new.mean_sum / new.mean_n
        return abs(b - a) / (abs(a) + 1e-6)
    return None
