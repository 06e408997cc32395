"""What an operator can do from the console: abort, roll back, promote, resume. Each goes
through the same Controller methods as the CLI, so the same signed desired state is published
and the same decision, with its reason, is written to the state file. Promote and resume go on
driving the rollout on a thread of the console (as `edgert fleet promote`/`resume` would in a
terminal); a stopped console leaves the rollout where it is, ready for `edgert fleet resume`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from edge_runtime.fleet.controller import Controller, FleetError

log = logging.getLogger(__name__)

ACTIONS = ("abort", "rollback", "promote", "resume")


class Stopped(Exception):
    pass


class Actions:
    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl
        self._drivers: dict[int, threading.Thread] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def driving(self, rid: int) -> bool:
        with self._lock:
            t = self._drivers.get(rid)
            return t is not None and t.is_alive()

    def run(self, action: str, rid: int, operator: str = "the operator") -> str:
        """Carry out an action; returns what was done, raises FleetError when it cannot be."""
        if action not in ACTIONS:
            raise FleetError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
        if self.ctl.link.key is None:
            raise FleetError("this console has no signing key (--signing-key): it cannot change desired state")
        if action == "abort":
            if not self.ctl.resolve(rid).active:
                raise FleetError(f"rollout {rid} is {self.ctl.resolve(rid).status}: nothing to abort")
            r = self.ctl.abort(rid, f"aborted from the console by {operator}")
            return f"rollout {r.id} aborted: group {r.group} is back on {r.from_version or 'no version'}"
        if action == "rollback":
            r = self.ctl.rollback(rid)
            return f"rollout {r.id} rolled back: group {r.group} is back on {r.from_version}"
        if action == "promote":
            r = self.ctl.promote(rid)
            self._drive(r.id)
            return f"{r.version} promoted to group {r.group}; the console drives the rollout to its end"
        r = self.ctl.resolve(rid)
        if not r.active:
            raise FleetError(f"rollout {r.id} is {r.status}: nothing to resume")
        if self.driving(r.id):
            raise FleetError(f"this console already drives rollout {r.id}")
        self._drive(r.id)
        return f"driving rollout {r.id} from the console"

    def _drive(self, rid: int) -> None:
        def check(_: Any) -> None:
            if self._stop.is_set():
                raise Stopped

        def work() -> None:
            try:
                self.ctl.drive(rid, progress=check)
            except Stopped:
                log.info("console stopping: rollout %d stays where it is (edgert fleet resume %d)", rid, rid)
            except Exception:  # the rollout's state is in the state file; the console keeps serving
                log.exception("driving rollout %d failed", rid)

        t = threading.Thread(target=work, name=f"drive-{rid}", daemon=True)
        with self._lock:
            self._drivers[rid] = t
        t.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            threads = list(self._drivers.values())
        for t in threads:
            t.join(10)
