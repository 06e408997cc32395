"""The controller's connection to the broker: what devices say about themselves (their retained
``status`` and ``state``), and the signed desired state it publishes.

Nothing here assumes one broker process: the controller is a client like any other, its view is
rebuilt from retained messages on every connect, so it runs unchanged against a clustered broker
(EMQX, HiveMQ, VerneMQ) behind a load balancer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from edge_runtime.contracts.fleet import (
    MAX_STATE_BYTES,
    PREFIX,
    BundleRef,
    DeviceState,
    DeviceStatus,
    ModelSpec,
    ModelState,
    desired_topic,
)
from edge_runtime.contracts.signed import desired_payload, sign
from edge_runtime.contracts.wire import WireError, parse_json
from edge_runtime.fleet.db import ControllerDB
from edge_runtime.fleet.publish import models_payload, publish_bundle

log = logging.getLogger(__name__)


@dataclass
class DeviceView:
    """What the controller knows of one device: its last status and state (typed, as the device
    published them) and when the controller last heard from it (the controller's own clock)."""

    id: str
    group: str = ""
    online: bool = False
    last_seen: float = 0.0
    state: DeviceState | None = None
    edgert: str = ""
    refused: int = 0  # messages from this device the controller could not use

    def model(self, name: str) -> ModelState:
        return self.state.model(name) if self.state is not None else ModelState()

    def serving(self, name: str) -> str | None:
        return self.model(name).served


@dataclass
class BrokerAuth:
    url: str
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None

    @classmethod
    def parse(
        cls, url: str, username: str | None = None, password_file: str | None = None, tls_ca: str | None = None
    ) -> BrokerAuth:
        """mqtt[s]://[USER[:PASSWORD]@]HOST:PORT; the password may also come from a file or
        EDGERT_MQTT_PASSWORD (kept out of the process list)."""
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"--broker expects mqtt://HOST:PORT or mqtts://HOST:PORT, got {url!r}")
        user = username or (unquote(u.username) if u.username else None)
        password = unquote(u.password) if u.password else None
        if password_file:
            password = Path(password_file).read_text().strip()
        password = password or os.environ.get("EDGERT_MQTT_PASSWORD")
        netloc = f"{u.hostname}:{u.port}" if u.port else u.hostname
        return cls(f"{u.scheme}://{netloc}", user, password, tls_ca)


class FleetLink:
    """The controller's broker session: a typed view of every device (retained status and state) and
    the publishing of signed desired state.

    Owns the MQTT client and the device views; refuses (and counts) what does not match the
    contract. Never decides a rollout: the Controller does."""

    def __init__(self, auth: BrokerAuth, key: Ed25519PrivateKey | None, db: ControllerDB, name: str = "controller"):
        import paho.mqtt.client as mqtt

        self.auth, self.key, self.db = auth, key, db
        self.devices: dict[str, DeviceView] = {}
        self.errors = 0  # callback failures (counted, logged, never fatal)
        self._groups: dict[str, str] = db.device_groups()
        self._lock = threading.Lock()
        self.connected = threading.Event()
        self.synced = threading.Event()
        # Bumped on every device message taken; a live view waits on it instead of polling.
        self.generation = 0
        self._changed = threading.Condition()
        u = urlparse(auth.url)
        self._host, self._port = u.hostname or "", u.port or (8883 if u.scheme == "mqtts" else 1883)
        client_id = f"edgert-{name}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
        )
        if auth.username:
            c.username_pw_set(auth.username, auth.password)
        if u.scheme == "mqtts" or auth.tls_ca:
            c.tls_set(ca_certs=auth.tls_ca)
        c.reconnect_delay_set(1, 10)
        c.max_inflight_messages_set(100)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        c.on_subscribe = self._on_subscribe
        self._sync_topic = f"{PREFIX}/controllers/{client_id}/sync"
        self.client = c

    def __enter__(self) -> FleetLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 15.0) -> None:
        """Connect and return once every retained device message was received: the broker sends
        them right after the subscription, in order, so a marker published to ourselves after the
        SUBACK comes back after them."""
        self.client.connect_async(self._host, self._port, 30)
        self.client.loop_start()
        if not self.synced.wait(timeout):
            self.stop()
            raise ConnectionError(f"cannot connect to the broker at {self.auth.url} (or sync) in {timeout:.0f} s")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # --- callbacks -------------------------------------------------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            log.error("broker refused the controller: %s", reason_code)
            return
        client.subscribe([(f"{PREFIX}/devices/+/status", 1), (f"{PREFIX}/devices/+/state", 1), (self._sync_topic, 1)])
        self.connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: Any, reason_codes: Any, properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            log.error("broker refused the controller's subscriptions: %s (check its ACL)", reason_codes)
            return
        client.publish(self._sync_topic, b"sync", qos=1)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            self._handle(msg)
        except Exception:  # nothing a device sends may stop the controller's network thread
            self.errors += 1
            log.exception("message on %s could not be handled; dropped", getattr(msg, "topic", "?"))

    def _handle(self, msg: Any) -> None:
        if msg.topic == self._sync_topic:
            self.synced.set()
            return
        parts = msg.topic.split("/")
        if len(parts) != 5 or not msg.payload:
            return
        device, kind = parts[3], parts[4]
        contract: type[DeviceStatus] | type[DeviceState] = DeviceStatus if kind == "status" else DeviceState
        try:
            data = contract.model_validate(parse_json(msg.payload, MAX_STATE_BYTES))
            if data.device != device:
                raise WireError("wrong-device", f"names device {data.device!r} on {device}'s topic")
        except (WireError, ValidationError) as e:
            detail = str(e).splitlines()[0][:200]
            log.warning("device %s sent a %s the controller cannot use (%s); ignored", device, kind, detail)
            with self._lock:
                self.devices.setdefault(device, DeviceView(device)).refused += 1
            return
        group = self._registered_group(device, data.group)
        with self._lock:
            view = self.devices.setdefault(device, DeviceView(device))
            view.last_seen = time.time()
            if group != data.group:
                view.refused += 1
            if group:
                view.group = group
            if isinstance(data, DeviceStatus):
                view.online = data.online
                view.edgert = data.edgert
            else:
                view.state = data
        with self._changed:
            self.generation += 1
            self._changed.notify_all()

    def wait_change(self, seen: int, timeout: float) -> int:
        """Block until a device message newer than generation ``seen`` was taken (or the timeout);
        returns the current generation."""
        with self._changed:
            self._changed.wait_for(lambda: self.generation != seen, timeout)
            return self.generation

    def _registered_group(self, device: str, claimed: str) -> str:
        """The group on the fleet's own record. A device is enrolled in the group it first claims;
        a later, different claim is not believed (a device cannot move itself into another
        group's rollout): `edgert fleet enroll DEVICE --group G` moves it."""
        registered = self._groups.get(device)
        if registered is None and claimed:
            registered = self._groups[device] = self.db.enroll(device, claimed)
        if registered is not None and claimed and claimed != registered:
            log.warning("device %s claims group %r; the fleet's record says %r (kept)", device, claimed, registered)
        return registered or claimed

    def group(self, group: str | None) -> list[DeviceView]:
        with self._lock:
            views = [v for v in self.devices.values() if group is None or v.group == group]
        return sorted(views, key=lambda v: v.id)

    def view(self, device: str) -> DeviceView | None:
        with self._lock:
            return self.devices.get(device)

    # --- publishing ------------------------------------------------------------------

    def desired(self, scope: str, models: dict[str, ModelSpec]) -> int:
        """Sign and publish (retained, QoS 1) a desired state; the message is kept in the state file
        so a restarted controller can publish exactly it again. Returns its seq."""
        if self.key is None:
            raise RuntimeError("publishing desired state needs the fleet signing key (--key)")
        seq = self.db.next_seq(scope)
        message = sign(desired_payload(scope, seq, models_payload(models)), self.key)
        self.db.record_message(scope, seq, message)
        self.client.publish(desired_topic(scope), message, qos=1, retain=True).wait_for_publish(30)
        return seq

    def republish(self, scopes: list[str]) -> int:
        """After a restart: the last signed message of each scope again, byte for byte (devices
        take it as the same state: idempotent)."""
        msgs = self.db.messages(scopes)
        infos = [self.client.publish(desired_topic(s), m, qos=1, retain=True) for s, _, m in msgs]
        for info in infos:
            info.wait_for_publish(30)
        return len(msgs)

    def publish_bundle(self, path: Path) -> BundleRef:
        return publish_bundle(self.client, path)
