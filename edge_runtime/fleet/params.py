"""A rollout's parameters as the operator gave them, checked once, stored with the rollout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_runtime.contracts.fleet import HealthPolicy
from edge_runtime.fleet.strategies import REGISTRY

STRATEGIES = tuple(REGISTRY)
DEFAULT_STEPS = {"canary": [10.0, 100.0], "staged": [1.0, 10.0, 50.0, 100.0]}


class FleetError(Exception):
    """A controller request that cannot be carried out; the message says why."""


@dataclass
class RolloutParams:
    """What the operator asked of a rollout (stages, thresholds, health window), checked once by
    ``validate`` and stored with the rollout as given."""

    steps: list[float] = field(default_factory=list)
    min_devices: int = 3
    max_failure_rate: float = 0.2
    health_window: float = 30.0
    min_inferences: int = 20
    stage_timeout: float = 0.0  # 0: 3 health windows + 60 s
    split: float = 10.0  # ab: percent of requests to the new version
    max_error_rate: float = 0.05
    max_p95_ratio: float = 3.0
    min_p95_increase_ms: float = 0.5  # a p95 ratio counts only above this absolute increase
    # A device that saw too little traffic in its window is unjudged: it fails the stage unless
    # the operator says an unjudged device counts as a pass (idle canaries prove nothing).
    unjudged: str = "fail"

    @classmethod
    def stored(cls, params: dict[str, Any]) -> RolloutParams:
        """The parameters as saved with a rollout (which also holds controller bookkeeping)."""
        return cls(**{k: v for k, v in params.items() if k in cls.__dataclass_fields__})

    def validate(self, strategy: str) -> None:
        if strategy not in STRATEGIES:
            raise FleetError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        if strategy in DEFAULT_STEPS:
            if not self.steps:
                self.steps = list(DEFAULT_STEPS[strategy])
            if any(not 0 < s <= 100 for s in self.steps) or self.steps != sorted(self.steps):
                raise FleetError(f"--steps must be increasing percentages in (0, 100], got {self.steps}")
            if self.steps[-1] != 100:
                self.steps.append(100.0)
        if not 0 <= self.max_failure_rate <= 1:
            raise FleetError(f"--max-failure-rate is a share in [0, 1], got {self.max_failure_rate}")
        if not 0 < self.split < 100:
            raise FleetError(f"--split is a percentage in (0, 100), got {self.split}")
        if self.health_window <= 0 or self.min_devices < 1:
            raise FleetError("--health-window must be > 0 and --min-devices >= 1")
        if self.unjudged not in ("fail", "pass"):
            raise FleetError(f"--unjudged is fail or pass, got {self.unjudged!r}")
        if not self.stage_timeout:
            self.stage_timeout = 3 * self.health_window + 60

    def health(self) -> HealthPolicy:
        return HealthPolicy(
            window_s=self.health_window,
            min_inferences=self.min_inferences,
            max_p95_ratio=self.max_p95_ratio,
            min_p95_increase_ms=self.min_p95_increase_ms,
        )
