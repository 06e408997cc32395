"""Simulated devices for tests, demos and capacity checks: each one is a real device agent (its
own state directory, store, outbox, MQTT client id and session) over a real Runtime, fed by a
traffic generator instead of a camera. Nothing about the fleet protocol is simulated: only the
frames are synthetic.

Each device draws its inputs around its own "sensor level" (``levels``, assigned round-robin):
devices see different data, as real ones do, so a version that breaks on some data breaks on
some devices only.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.contracts.bundle import load_public_keys
from edge_runtime.device.agent.session import Agent, AgentConfig
from edge_runtime.serving.runtime import Runtime
from edge_runtime.serving.store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class SimSettings:
    url: str
    state_root: Path
    group: str
    trust: Path
    fleet_key: Path
    password: str | None = None
    prefix: str = "sim"
    target: str = "x86-cpu"
    rate_hz: float = 10.0
    levels: tuple[float, ...] = (0.5,)
    telemetry_interval_s: float = 1.0
    bundles: tuple[Path, ...] = ()  # installed at the first boot (a factory image); else devices start empty


class SimDevice:
    """One simulated device: a real Runtime, store, outbox and Agent in its own state dir, fed
    synthetic sensor traffic. Used by `edgert fleet simulate` and the fleet tests."""

    def __init__(self, index: int, s: SimSettings) -> None:
        self.index, self.s = index, s
        self.id = f"{s.prefix}-{index:03d}"
        self.level = s.levels[index % len(s.levels)]
        self.root = Path(s.state_root) / self.id
        self.store = ModelStore(self.root)
        if not self.store.trusted_keys():
            self.store.trust(s.trust)
            for bundle in s.bundles:
                self.store.install(bundle)
        self.rng = np.random.default_rng(index)
        self.sent = self.failed = 0
        self.runtime: Runtime | None = None
        self.agent: Agent | None = None
        self._stop = threading.Event()
        self._traffic: threading.Thread | None = None

    def start(self) -> None:
        """Boot: recover an interrupted update, load the active models, join the fleet."""
        self._stop.clear()
        recovered = self.store.recover()
        self.runtime = Runtime(self.store.trusted_keys(), threads=1, spin=False)
        for m in self.store.active():
            try:
                self.runtime.load(m.path)
            except Exception as e:  # a device that cannot load its model still joins the fleet
                log.error("%s: cannot load %s %s: %s", self.id, m.name, m.version, e)
        cfg = AgentConfig(
            url=self.s.url, device_id=self.id, group=self.s.group, fleet_keys=load_public_keys([self.s.fleet_key]),
            target=self.s.target, username=self.id, password=self.s.password,
            telemetry_interval_s=self.s.telemetry_interval_s,
        )  # fmt: skip
        self.agent = Agent(cfg, self.runtime, self.store, self.store.trusted_keys, recovered=recovered)
        self.agent.start()
        if self.s.rate_hz > 0:
            self._traffic = threading.Thread(target=self._traffic_loop, name=f"traffic-{self.id}", daemon=True)
            self._traffic.start()

    def stop(self) -> None:
        """A clean shutdown (the offline status is published): a device switched off."""
        self._stop.set()
        if self._traffic is not None:
            self._traffic.join(10)
        if self.agent is not None:
            self.agent.stop()
        if self.runtime is not None:
            self.runtime.close()
        self.agent = self.runtime = None

    def frame(self, shape: list[Any], dtype: str) -> np.ndarray:
        dims = [1 if isinstance(d, str) else int(d) for d in shape]
        if np.dtype(dtype).kind == "f":
            return self.rng.uniform(self.level - 0.1, self.level + 0.1, dims).astype(dtype)
        return (self.rng.uniform(self.level - 0.1, self.level + 0.1, dims) * 255).clip(0, 255).astype(dtype)

    def infer_once(self) -> None:
        rt = self.runtime
        if rt is None:
            return
        for h in rt.models():
            feeds = {i.name: self.frame(list(i.shape), i.dtype) for i in h.inputs}
            self.sent += 1
            try:
                rt.infer(h.name, feeds, timeout_ms=5000)
            except Exception:
                self.failed += 1

    def _traffic_loop(self) -> None:
        period = 1.0 / self.s.rate_hz
        next_t = time.monotonic() + self.rng.uniform(0, period)  # devices out of phase
        while not self._stop.is_set():
            delay = next_t - time.monotonic()
            if delay > 0 and self._stop.wait(delay):
                return
            next_t = max(next_t + period, time.monotonic() - period)
            self.infer_once()


class Simulation:
    def __init__(self, settings: SimSettings, devices: int) -> None:
        self.settings = settings
        self.devices = [SimDevice(i, settings) for i in range(devices)]

    def start(self) -> None:
        for d in self.devices:
            d.start()

    def stop(self) -> None:
        threads = [threading.Thread(target=d.stop) for d in self.devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    def __enter__(self) -> Simulation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serving(self, model: str) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for d in self.devices:
            h = next((h for h in d.runtime.models() if h.name == model), None) if d.runtime else None
            out[d.id] = h.current.version if h else None
        return out
