"""What the console remembers over time.

- Per rollout, every ``period`` seconds while it is active (and once after it ends): per version,
  the devices of the group serving it, the rows served in the interval, the interval's error
  rate and the median of device p95s. Written to the controller's state file (``samples``), so a
  restarted console still plots the whole rollout.
- Per device, in memory: a short ring of snapshots (serving versions, error rate, p95, outbox
  depth) and an event list of what changed (online/offline, version served, update outcome,
  rollback), for the device's page.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edge_runtime.fleet.db import ControllerDB, Rollout
from edge_runtime.fleet.link import DeviceView, FleetLink

log = logging.getLogger(__name__)

RING = 300  # snapshots per device (10 minutes at 2 s)
EVENTS = 50
AFTER_END_S = 60.0


@dataclass
class DeviceHistory:
    snapshots: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RING))
    events: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=EVENTS))
    last: dict[str, Any] = field(default_factory=dict)


def _figures(v: DeviceView) -> dict[str, Any]:
    models: dict[str, Any] = {}
    st = v.state
    for name, m in (st.models if st is not None else {}).items():
        live = m.live
        models[name] = {
            "serving": m.served,
            "rows": live.rows if live is not None else 0,
            "bad": (live.errors + live.nonfinite) if live is not None else 0,
            "p95_ms": live.p95_ms if live is not None else None,
            "outcome": (m.outcome.version, m.outcome.outcome.value, m.outcome.reason) if m.outcome else None,
        }
    return {
        "online": v.online,
        "models": models,
        "outbox": st.outbox.depth if st is not None else None,
        "rollback": (st.last_rollback.ts, st.last_rollback.reason) if st is not None and st.last_rollback else None,
    }


class History:
    def __init__(self, link: FleetLink, db: ControllerDB, period: float = 2.0) -> None:
        self.link, self.db, self.period = link, db, period
        self.devices: dict[str, DeviceHistory] = {}
        self._totals: dict[tuple[int, str], tuple[str | None, int, int]] = {}  # (rollout, device) -> counters
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console-history", daemon=True)
        self.errors = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a bad state from one device or a busy state file: the next tick tries again
                self.errors += 1
                log.exception("console history sample failed")
            self._stop.wait(self.period)

    # --- one tick ----------------------------------------------------------------------

    def sample(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        views = self.link.group(None)
        with self._lock:
            for v in views:
                self._device(v, now)
        # Sampled while it runs and for a while after it ends: an abort's plots show the way back.
        for r in self.db.rollouts(active_only=True, finished_since=now - AFTER_END_S):
            self._rollout(r, [v for v in views if v.group == r.group], now)

    def _device(self, v: DeviceView, now: float) -> None:
        h = self.devices.setdefault(v.id, DeviceHistory())
        fig = _figures(v)
        last = h.last
        if last:
            if fig["online"] != last["online"]:
                h.events.append((now, "came online" if fig["online"] else "went offline"))
            for name, m in fig["models"].items():
                before = last["models"].get(name, {})
                if m["serving"] != before.get("serving"):
                    h.events.append((now, f"{name}: serving {before.get('serving') or 'nothing'} -> {m['serving']}"))
                if m["outcome"] and m["outcome"] != before.get("outcome"):
                    ver, outcome, reason = m["outcome"]
                    h.events.append((now, f"{name} {ver}: {outcome}" + (f" ({reason})" if reason else "")))
            if fig["rollback"] and fig["rollback"] != last["rollback"]:
                h.events.append((now, f"rolled back on the device: {fig['rollback'][1]}"))
        prev = h.snapshots[-1] if h.snapshots else None
        snap: dict[str, Any] = {"ts": now, "online": fig["online"], "outbox": fig["outbox"], "models": {}}
        for name, m in fig["models"].items():
            p = (prev or {}).get("models", {}).get(name)
            rows, bad = m["rows"], m["bad"]
            if p and p["serving"] == m["serving"] and rows >= p["rows_total"]:
                d_rows, d_bad = rows - p["rows_total"], bad - p["bad_total"]
            else:
                d_rows, d_bad = rows, bad
            snap["models"][name] = {
                "serving": m["serving"],
                "rows_total": rows,
                "bad_total": bad,
                "error_rate": d_bad / d_rows if d_rows else None,
                "p95_ms": m["p95_ms"],
            }
        h.snapshots.append(snap)
        h.last = fig

    def _rollout(self, r: Rollout, views: list[DeviceView], now: float) -> None:
        per: dict[str, dict[str, Any]] = {}
        for v in views:
            m = v.model(r.name)
            ver = m.served or "none"
            agg = per.setdefault(ver, {"devices": 0, "rows": 0, "bad": 0, "p95": []})
            agg["devices"] += 1
            live = m.live
            if live is None:
                continue
            rows, bad = live.rows, live.errors + live.nonfinite
            key = (r.id, v.id)
            before = self._totals.get(key)
            if before is not None and before[0] == m.served and rows >= before[1]:
                agg["rows"] += rows - before[1]
                agg["bad"] += bad - before[2]
            elif before is not None:  # a new version (counters restart): all it has served so far
                agg["rows"] += rows
                agg["bad"] += bad
            self._totals[key] = (m.served, rows, bad)
            if live.p95_ms is not None:
                agg["p95"].append(live.p95_ms)
        rows_out = [
            (
                ver,
                a["devices"],
                a["rows"],
                a["bad"] / a["rows"] if a["rows"] else None,
                statistics.median(a["p95"]) if a["p95"] else None,
            )
            for ver, a in sorted(per.items())
        ]
        if rows_out:
            self.db.add_samples(r.id, now, rows_out)

    # --- reading -----------------------------------------------------------------------

    def device(self, device: str) -> DeviceHistory | None:
        with self._lock:
            h = self.devices.get(device)
            if h is None:
                return None
            return DeviceHistory(deque(h.snapshots, RING), deque(h.events, EVENTS), dict(h.last))
