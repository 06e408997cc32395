"""Worker supervision for the agent: each worker loop runs on its own thread; a thread that dies
(only a bug can end one now: every loop catches what it cannot handle) is restarted and counted,
and so is the MQTT network thread. Too many restarts in a window mean the agent cannot recover:
``supervise`` then says so, and the daemon stops feeding the systemd watchdog."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Supervisor:
    """Owns the agent's worker threads and their restart budget. Never runs a worker's logic."""

    def __init__(
        self,
        workers: dict[str, Callable[[], None]],
        error: Callable[[str], None],
        network: Any = None,
        max_restarts: int = 5,
        window_s: float = 600.0,
    ) -> None:
        """``network``: a paho client whose loop thread is watched too (``loop_start`` revives it)."""
        self.workers, self.error, self.network = workers, error, network
        self.max_restarts, self.window_s = max_restarts, window_s
        self.threads = {name: self._thread(name) for name in workers}
        self._restarts: list[float] = []

    def _thread(self, name: str) -> threading.Thread:
        return threading.Thread(target=self.workers[name], name=name, daemon=True)

    def start(self) -> None:
        for t in self.threads.values():
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads.values():
            t.join(timeout)

    def replace(self, name: str, target: Callable[[], None]) -> None:
        """Swap a worker's body (tests use it to make one die) and start it."""
        self.workers[name] = target
        self.threads[name] = self._thread(name)
        self.threads[name].start()

    def supervise(self) -> bool:
        now = time.monotonic()
        for name, t in list(self.threads.items()):
            if not t.is_alive():
                log.error("agent worker %s died; restarting it", name)
                self.error(f"dead-{name}")
                self._restarts.append(now)
                self.threads[name] = self._thread(name)
                self.threads[name].start()
        loop = getattr(self.network, "_thread", None) if self.network is not None else None
        if self.network is not None and (loop is None or not loop.is_alive()):
            log.error("the MQTT network thread is gone; restarting it")
            self.error("dead-mqtt-loop")
            self._restarts.append(now)
            self.network.loop_stop()
            self.network.loop_start()
        self._restarts = [t for t in self._restarts if now - t < self.window_s]
        return len(self._restarts) <= self.max_restarts
