"""The MQTT device agent: makes a device part of a fleet without ever being needed to serve.

Topics: contracts/fleet.py. paho-mqtt 2 with MQTT 5, a persistent session (clean_start off,
session expiry), reconnect with backoff 1-30 s. paho keeps unsent messages in memory only, so
telemetry goes through the SQLite outbox (telemetry.py) and a record is deleted only once the
broker acknowledged it (PUBACK).

This module is the wiring: the broker session and its callbacks. What a desired state means is
convergence.py's job, bundles arrive through downloads.py, versions move through updater.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from edge_runtime import __version__
from edge_runtime.contracts.durable import atomic_write, take_corruption_reports
from edge_runtime.contracts.fleet import (
    PREFIX,
    DesiredState,
    DeviceState,
    DeviceStatus,
    UpdateOutcome,
    desired_topic,
    device_topic,
    wire,
)
from edge_runtime.contracts.signed import ControlRefused, open_envelope
from edge_runtime.device.agent.convergence import Converger
from edge_runtime.device.agent.downloads import Downloads
from edge_runtime.device.agent.outbox import Outbox
from edge_runtime.device.agent.records import AgentRecords
from edge_runtime.device.agent.seq_guard import SeqGuard
from edge_runtime.device.agent.state import device_state
from edge_runtime.device.agent.supervisor import Supervisor
from edge_runtime.device.agent.telemetry import Telemetry
from edge_runtime.device.agent.updater import Updater
from edge_runtime.serving.runtime import Runtime
from edge_runtime.serving.store import ModelStore

log = logging.getLogger(__name__)


@dataclass
class AgentConfig:
    url: str
    device_id: str
    group: str
    fleet_keys: list[Ed25519PublicKey]
    target: str
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    telemetry_interval_s: float = 10.0
    outbox_max_bytes: int = 64 << 20
    keepalive: int = 30


class Agent:
    """A device's broker session: connects, subscribes to its desired-state topics, checks every
    control message (signature, scope, sequence, schema) and hands what it accepts to the
    converger; runs the telemetry and update threads.

    It never blocks a broker callback on work (downloads, loads and health windows run on the
    updater thread), and never lets an exception escape a callback or a worker loop.
    """

    def __init__(
        self,
        cfg: AgentConfig,
        runtime: Runtime,
        store: ModelStore,
        updater: Updater | Callable[[], list[Ed25519PublicKey]],
        recovered: list[Any] | None = None,
    ) -> None:
        """``updater``: the daemon's Updater (shared, so one place moves versions), or the
        function that returns the trusted bundle keys to make one with."""
        import paho.mqtt.client as mqtt

        self.cfg, self.runtime, self.store = cfg, runtime, store
        self.dir = store.root / "agent"
        self.records = AgentRecords(self.dir)
        self.outbox = Outbox(store.root / "outbox.db", cfg.outbox_max_bytes)
        self.seq = SeqGuard(self.dir / "control-seq.json", known=self.records.known_seqs())
        self._write_identity()
        self.rebuilt = take_corruption_reports()  # state files found corrupt at start (store, guard, records)
        self._errors = runtime.metrics.registry.counter(
            "edgert_agent_errors_total", "Failures inside the fleet agent (caught, counted, survived)", ("where",)
        )
        self.updater = updater if isinstance(updater, Updater) else Updater(store, runtime, updater, cfg.target)
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._work = threading.Event()
        self.scopes = {
            device_topic(cfg.device_id, "desired"): cfg.device_id,
            desired_topic(f"group:{cfg.group}"): f"group:{cfg.group}",
        }

        u = urlparse(cfg.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"--broker expects mqtt://HOST:PORT or mqtts://HOST:PORT, got {cfg.url!r}")
        self._host, self._port = u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.device_id, protocol=mqtt.MQTTv5)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if u.scheme == "mqtts" or cfg.tls_ca:
            c.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key)
        c.will_set(device_topic(cfg.device_id, "status"), self._status(False), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_inflight_messages_set(50)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        self.client = c

        self.telemetry = Telemetry(
            cfg.device_id, c, self.outbox, runtime, self.state, self.connected, cfg.telemetry_interval_s
        )
        self.downloads = Downloads(
            self.updater.downloads,
            subscribe=self._subscribe_chunks,
            unsubscribe=self._unsubscribe_chunks,
            on_complete=self._work.set,
        )
        # Versions the daemon was running its health window on when it died: crashed, not retried
        # until the controller signs a new desired state.
        crashed = {(str(e["model"]), str(e["from"])) for e in recovered or []}
        self.converger = Converger(
            cfg.device_id, cfg.group, runtime, store, self.updater, self.downloads, self.records,
            self.event, self.publish_state, lambda: self.seq.scopes(), crashed,
        )  # fmt: skip
        for entry in recovered or []:
            self.event("update-rolled-back", {**entry, "to": entry["from"], "restored": entry["to"]})
            self.records.record_outcome(
                str(entry["model"]), str(entry["from"]), UpdateOutcome.ROLLED_BACK,
                "the daemon died during the update", self.seq.scopes(),
            )  # fmt: skip
        for report in self.rebuilt:
            self.event("state-file-rebuilt", report)
        if self.outbox.degraded:
            self.event("outbox-degraded", {"reason": self.outbox.degraded})
        self.workers = Supervisor(
            {
                "outbox-sender": lambda: self.telemetry.send_loop(self._stop, self._error),
                "telemetry": lambda: self.telemetry.snapshot_loop(self._stop, self._error),
                "updater": self._update_loop,
            },
            self._error,
            network=c,
        )

    def _write_identity(self) -> None:
        """Who this state dir belongs to, for `edgert status` (which runs without the daemon)."""
        identity = {"device": self.cfg.device_id, "group": self.cfg.group, "target": self.cfg.target}
        try:
            atomic_write(self.dir / "identity.json", json.dumps(identity).encode())
        except OSError as e:
            log.error("cannot record the device identity: %s", e)

    # compatibility views for callers and tests
    @property
    def rejected(self) -> set[tuple[str, str, str]]:
        return self.converger.rejected

    @property
    def refused(self) -> dict[str, int]:
        return self.records.refusals()

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 24 * 3600  # the broker keeps our session across outages
        self.client.connect_async(self._host, self._port, self.cfg.keepalive, clean_start=False, properties=props)
        self.client.loop_start()
        self.workers.start()

    def _error(self, where: str) -> None:
        """Something failed inside the agent and was survived: counted where an operator sees it
        (/metrics, the device's state, edgert status)."""
        self.records.count_error(where)
        self._errors.inc(where=where)

    def supervise(self) -> bool:
        """Restart dead workers; False when the agent cannot recover (the daemon then withholds
        the watchdog, so systemd restarts it rather than letting HTTP pretend all is well)."""
        return True if self._stop.is_set() else self.workers.supervise()

    def stop(self) -> None:
        self._stop.set()
        self._work.set()
        self.outbox.wake.set()
        self.workers.join(10)
        if self.connected.is_set():
            info = self.client.publish(device_topic(self.cfg.device_id, "status"), self._status(False), 1, True)
            info.wait_for_publish(3)
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()

    def _status(self, online: bool) -> bytes:
        return wire(
            DeviceStatus(
                device=self.cfg.device_id, group=self.cfg.group, online=online, ts=time.time(), edgert=__version__
            )
        )

    def _subscribe_chunks(self, topic: str) -> None:
        if self.connected.is_set():  # else _on_connect subscribes to every transfer in progress
            self.client.subscribe(topic, 1)

    def _unsubscribe_chunks(self, topic: str) -> None:
        self.client.unsubscribe(topic)

    # --- MQTT callbacks (network thread: keep them short) ----------------------------

    # Every callback is guarded: an exception inside paho's network thread would end that thread
    # (the agent would hear nothing more) and leave the message unacknowledged, delivered again
    # after every restart. A message that cannot be handled is counted, dropped and acknowledged.

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._guarded("on_connect", self._handle_connect, client, flags, reason_code)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._guarded("on_disconnect", self._handle_disconnect, reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self._guarded("on_message", self._handle_message, msg)

    def _guarded(self, where: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:
            self._error(where)
            log.exception("%s failed (%s); dropped, the agent goes on", where, type(e).__name__)

    def _handle_connect(self, client: Any, flags: Any, reason_code: Any) -> None:
        if reason_code.is_failure:
            # Not connected: a refused CONNECT (bad credentials, not authorized) is not a session.
            log.error("broker refused the connection: %s", reason_code)
            self.connected.clear()
            return
        log.info("connected to %s:%s (session present: %s)", self._host, self._port, flags.session_present)
        client.publish(device_topic(self.cfg.device_id, "status"), self._status(True), qos=1, retain=True)
        client.subscribe([(topic, 1) for topic in self.scopes])
        for sha in self.downloads.in_progress():
            client.subscribe(f"{PREFIX}/bundles/{sha}/+", 1)
        self.connected.set()
        self.outbox.wake.set()
        self._work.set()

    def _handle_disconnect(self, reason_code: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); serving goes on, telemetry is kept", reason_code)

    def _handle_message(self, msg: Any) -> None:
        topic = msg.topic
        if topic.startswith(f"{PREFIX}/bundles/"):
            self.downloads.on_chunk(topic, msg.payload)
            return
        scope = self.scopes.get(topic)
        if scope is None:
            self._refuse("wrong-topic", f"unexpected topic {topic}")
            return
        if not msg.payload:
            return  # a cleared retained message
        try:
            payload = open_envelope(msg.payload, self.cfg.fleet_keys, scope, "desired")
            last = self.seq.last(scope)
            if payload["seq"] == last and self.converger.knows(scope):
                return  # the same desired state again (retained on resubscribe, QoS 1 duplicate): idempotent
            if payload["seq"] != last:  # equal and unknown: our own accepted state, back after a restart
                self.seq.check(scope, payload["seq"])
            try:
                state = DesiredState.model_validate(payload)
            except ValidationError as e:
                raise ControlRefused("malformed", _brief_error(e)) from e
        except ControlRefused as e:
            self._refuse(e.reason, str(e))
            return
        self.seq.accept(scope, state.seq)
        self.converger.accept(state, new=state.seq != last)
        self._work.set()

    def _refuse(self, reason: str, detail: str) -> None:
        log.warning("control message refused (%s): %s", reason, detail)
        self.records.count_refusal(reason)
        self._errors.inc(where=f"refused-{reason}")
        self.event("control-refused", {"reason": reason, "detail": detail[:300]})

    # --- telemetry and state ---------------------------------------------------------

    def event(self, kind: str, data: dict[str, Any]) -> None:
        try:
            self.telemetry.event(kind, data)
        except Exception as e:  # disk full, outbox broken: the event is lost, the agent is not
            self._error("event")
            log.error("event %s could not be stored (%s)", kind, e)

    def publish_state(self) -> None:
        self.telemetry.publish_state()

    def state(self) -> DeviceState:
        return device_state(
            self.store, self.outbox.stats(), self.records.refusals(), self.cfg.device_id, self.cfg.group,
            self.cfg.target, self.seq.scopes(), self.runtime, self.records.outcome_of(),
            self.records.error_counts(), len(self.rebuilt),
        )  # fmt: skip

    # --- updates ---------------------------------------------------------------------

    def _update_loop(self) -> None:
        while not self._stop.is_set():
            self._work.wait(2.0)
            self._work.clear()
            try:
                self.converger.converge_all(self._stop.is_set)
            except Exception:  # e.g. a store that cannot be read: try again on the next wake-up
                self._error("updater")
                log.exception("convergence failed; trying again")
                self._stop.wait(2.0)


def _brief_error(e: ValidationError) -> str:
    """A schema refusal in one line: which field, what was wrong (no pydantic URLs)."""
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    return "desired state does not match the schema: " + "; ".join(parts)
