"""Telemetry: metrics snapshots into the outbox, the outbox sent to the broker in order, and the
device's retained state published.

The outbox (SQLite) is the only place telemetry lives until the broker acknowledged it: a record
is deleted only after its PUBACK, so an outage or a kill -9 loses nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edge_runtime.contracts.fleet import DeviceState, device_topic, wire
from edge_runtime.device.agent.outbox import Outbox
from edge_runtime.serving.runtime import Runtime

log = logging.getLogger(__name__)


class Telemetry:
    """Owns the two telemetry loops (snapshot, send) and state publishing. Never decides what the
    device runs; it reports it."""

    def __init__(
        self,
        device_id: str,
        client: Any,
        outbox: Outbox,
        runtime: Runtime,
        state: Callable[[], DeviceState],
        connected: threading.Event,
        interval_s: float,
    ) -> None:
        self.device_id, self.client, self.outbox, self.runtime = device_id, client, outbox, runtime
        self.state, self.connected, self.interval_s = state, connected, interval_s

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.outbox.put("event", {"event": kind, **data})

    def publish_state(self) -> None:
        if not self.connected.is_set():
            return
        self.client.publish(device_topic(self.device_id, "state"), wire(self.state()), qos=1, retain=True)

    def snapshot_loop(self, stop: threading.Event, error: Callable[[str], None] = lambda where: None) -> None:
        while not stop.wait(self.interval_s):
            try:
                models = {}
                for h in self.runtime.models():
                    models[h.name] = {"version": h.current.version, **h.current.stats.snapshot().model_dump()}
                self.outbox.put("metrics", {"models": models, "outbox": self.outbox.stats()})
                self.publish_state()
            except OSError as e:  # a full or failing disk: expected in the field, one line each time
                error("telemetry")
                log.error("telemetry snapshot not stored (%s); trying again next period", e)
            except Exception:  # anything else must not end telemetry for good either
                error("telemetry")
                log.exception("telemetry snapshot failed; trying again next period")

    def send_loop(self, stop: threading.Event, error: Callable[[str], None] = lambda where: None) -> None:
        """Oldest first; a record is deleted only after its PUBACK; in order per device."""
        while not stop.is_set():
            try:
                self._send_some()
            except Exception:  # the outbox unreadable for a moment, a broken record: go on
                error("outbox-sender")
                log.exception("sending telemetry failed; trying again")
                stop.wait(1.0)

    def _send_some(self) -> None:
        """One batch: publish it pipelined, then delete the prefix the broker acknowledged."""
        events, telemetry = device_topic(self.device_id, "events"), device_topic(self.device_id, "telemetry")
        if not self.connected.wait(0.5):
            return
        batch = self.outbox.peek(50)
        if not batch:
            self.outbox.wake.wait(1.0)
            self.outbox.wake.clear()
            return
        # Publish the whole batch (pipelined, up to 50 in flight), then delete the prefix the
        # broker acknowledged, in order. Anything sent but unacknowledged stays and is sent
        # again later: receivers drop the duplicate by its seq.
        sent = []
        for rec in batch:
            topic = events if rec.kind == "event" else telemetry
            sent.append((rec.seq, self.client.publish(topic, rec.message(self.device_id), qos=1)))
        acked = 0
        for seq, info in sent:
            try:
                info.wait_for_publish(10)
            except (RuntimeError, ValueError):  # not queued: the connection went away
                break
            if not info.is_published():
                break
            acked = seq
        if acked:
            self.outbox.ack(acked)
        else:
            time.sleep(0.5)
