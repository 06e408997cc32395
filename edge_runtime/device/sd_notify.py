"""sd_notify without a dependency: READY, STATUS, WATCHDOG, STOPPING over $NOTIFY_SOCKET.

The watchdog pings only while the serving loop makes progress: every model's batcher must
have finished a batch or looked at an empty queue within the watchdog interval. A batcher
stuck in a hung backend stops the pings, so systemd (WatchdogSec=) restarts the daemon.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None or not self.address:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address  # abstract namespace
        try:
            self._sock.sendto("\n".join(lines).encode(), target)
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.address, e)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping: draining in-flight requests")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Seconds of WatchdogSec when systemd asked for pings from this very process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid.isdigit() and int(pid) != os.getpid()):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None


class Watchdog:
    """Pings at half the interval while ``healthy()`` holds; stays silent while it does not."""

    def __init__(self, notifier: Notifier, interval: float, healthy: Callable[[float], bool]) -> None:
        self.notifier, self.interval, self.healthy = notifier, interval, healthy
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self.stalled = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval / 2):
            if self.healthy(self.interval):
                if self.stalled:
                    log.warning("serving loop progresses again; watchdog pings resumed")
                self.stalled = False
                self.notifier.notify("WATCHDOG=1")
            elif not self.stalled:
                self.stalled = True
                log.error("serving loop made no progress for %.1f s: withholding watchdog pings", self.interval)
                self.notifier.status("stalled: a batcher made no progress within the watchdog interval")


def loop_progressing(last_progress: list[float], within: float) -> bool:
    now = time.monotonic()
    return all(now - t <= within for t in last_progress)
