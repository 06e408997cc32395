"""Rollout strategies, one stepper each, chosen through a registry (like the backends): adding a
strategy is adding a module and a line here. A stepper advances one rollout by one tick: it
publishes signed desired state through the controller, judges devices, and records decisions.

    canary      a first share of the group (--steps, default 10 then 100), then the rest
    staged      a list of percentages (default 1,10,50,100); each stage waits for at least
                --min-devices devices (or all it moved, when fewer) to pass their health window
    blue-green  every device loads and warms the new version beside the old (standby), then the
                whole group switches at once; the old version stays warm: switching back is instant
    shadow      devices run the new version on the same inputs without serving it and report
                agreement; the operator promotes or drops it
    ab          a share (--split) of each device's requests is served by the new version;
                per-variant figures side by side; promote or drop
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_runtime.fleet.controller import Controller
    from edge_runtime.fleet.db import Rollout
    from edge_runtime.fleet.params import RolloutParams

Stepper = Callable[["Controller", "Rollout", "RolloutParams"], None]

REGISTRY: dict[str, str] = {
    "canary": "edge_runtime.fleet.strategies.staged:step",
    "staged": "edge_runtime.fleet.strategies.staged:step",
    "blue-green": "edge_runtime.fleet.strategies.blue_green:step",
    "shadow": "edge_runtime.fleet.strategies.experiment:step",
    "ab": "edge_runtime.fleet.strategies.experiment:step",
}
EXPERIMENTS = ("shadow", "ab")  # observe first; promoted by the operator
NEEDS_SERVED_VERSION = ("blue-green", "shadow", "ab")


def stepper(strategy: str) -> Stepper:
    module, _, attr = REGISTRY[strategy].partition(":")
    fn: Stepper = getattr(importlib.import_module(module), attr)
    return fn
