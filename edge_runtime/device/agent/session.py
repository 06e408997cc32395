"""The MQTT device agent: makes a device part of a fleet without ever being needed to serve.

Topics (v1; README "MQTT topics"):

    edgert/v1/devices/{id}/status      retained  online/offline (the offline one is the last will)
    edgert/v1/devices/{id}/state       retained  actual state: versions, staged, last rollback, outbox
    edgert/v1/devices/{id}/telemetry   QoS 1     outbox records: metrics snapshots, sampled results
    edgert/v1/devices/{id}/events      QoS 1     outbox records: updates, rollbacks, refusals
    edgert/v1/devices/{id}/desired     retained  signed desired state for this device
    edgert/v1/groups/{group}/desired   retained  signed desired state for the group
    edgert/v1/bundles/{sha256}/{i}     retained  chunk i of a bundle (hashes in the desired state)

paho-mqtt 2 with MQTT 5, a persistent session (clean_start off, session expiry), reconnect with
backoff 1-30 s. paho keeps unsent messages in memory only, so telemetry goes through the SQLite
outbox and a record is deleted only once the broker acknowledged it (PUBACK).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime import __version__
from edge_runtime.contracts.signed import ControlRefused, SeqGuard, open_envelope
from edge_runtime.device.agent.outbox import Outbox
from edge_runtime.device.agent.updater import BundleRef, ChunkStore, Updater, UpdateRefused, crash_point, fetch_url
from edge_runtime.serving.health import HealthPolicy
from edge_runtime.serving.runtime import Runtime
from edge_runtime.serving.store import ModelStore, atomic_write

log = logging.getLogger(__name__)
PREFIX = "edgert/v1"


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
    def __init__(
        self,
        cfg: AgentConfig,
        runtime: Runtime,
        store: ModelStore,
        bundle_keys: Any,
        recovered: list[Any] | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt

        self.cfg, self.runtime, self.store = cfg, runtime, store
        self.dir = store.root / "agent"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(store.root / "outbox.db", cfg.outbox_max_bytes)
        self.seq = SeqGuard(self.dir / "control-seq.json")
        self.updater = Updater(store, runtime, bundle_keys, cfg.target)
        counters_path = self.dir / "counters.json"
        outcomes_path = self.dir / "outcomes.json"
        # The last update outcome per model, with the desired-state seqs it answered: the controller
        # tells "failed in this rollout" from an old failure by those seqs.
        self.outcomes: dict[str, dict[str, Any]] = (
            json.loads(outcomes_path.read_text()) if outcomes_path.exists() else {}
        )
        self._lock = threading.Lock()
        self.refused: Counter[str] = Counter(json.loads(counters_path.read_text()) if counters_path.exists() else {})
        self.desired: dict[str, dict[str, Any]] = {}  # scope -> models
        self.rejected: set[tuple[str, str, str]] = set()  # (model, version, sha) that failed: not retried
        # Versions the daemon was running its health window on when it died: crashed, not retried
        # until the controller signs a new desired state.
        self.crashed: set[tuple[str, str]] = {(str(e["model"]), str(e["from"])) for e in recovered or []}
        for entry in recovered or []:
            self.event("update-rolled-back", {**entry, "to": entry["from"], "restored": entry["to"]})
            self._outcome(str(entry["model"]), str(entry["from"]), "rolled-back", "the daemon died during the update")
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._work = threading.Event()
        self._chunks: dict[str, ChunkStore] = {}
        self.base = f"{PREFIX}/devices/{cfg.device_id}"
        self.scopes = {
            f"{self.base}/desired": cfg.device_id,
            f"{PREFIX}/groups/{cfg.group}/desired": f"group:{cfg.group}",
        }

        u = urlparse(cfg.url)
        if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
            raise ValueError(f"--mqtt expects mqtt://HOST:PORT or mqtts://HOST:PORT, got {cfg.url!r}")
        self._host, self._port = u.hostname, u.port or (8883 if u.scheme == "mqtts" else 1883)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.device_id, protocol=mqtt.MQTTv5)
        if cfg.username:
            c.username_pw_set(cfg.username, cfg.password)
        if u.scheme == "mqtts" or cfg.tls_ca:
            c.tls_set(ca_certs=cfg.tls_ca, certfile=cfg.tls_cert, keyfile=cfg.tls_key)
        c.will_set(f"{self.base}/status", self._status(False), qos=1, retain=True)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.max_inflight_messages_set(50)
        c.on_connect, c.on_disconnect, c.on_message = self._on_connect, self._on_disconnect, self._on_message
        self.client = c
        self._threads = [
            threading.Thread(target=self._send_loop, name="outbox-sender", daemon=True),
            threading.Thread(target=self._telemetry_loop, name="telemetry", daemon=True),
            threading.Thread(target=self._update_loop, name="updater", daemon=True),
        ]

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 7 * 24 * 3600  # the broker keeps our session across outages
        self.client.connect_async(self._host, self._port, self.cfg.keepalive, clean_start=False, properties=props)
        self.client.loop_start()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        self._work.set()
        self.outbox.wake.set()
        for t in self._threads:
            t.join(10)
        if self.connected.is_set():
            self.client.publish(f"{self.base}/status", self._status(False), qos=1, retain=True).wait_for_publish(3)
        self.client.disconnect()
        self.client.loop_stop()
        self.outbox.close()

    def _status(self, online: bool) -> bytes:
        return json.dumps(
            {"device": self.cfg.device_id, "group": self.cfg.group, "online": online, "ts": time.time(),
             "edgert": __version__}
        ).encode()  # fmt: skip

    # --- MQTT callbacks (network thread: keep them short) ----------------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            # Not connected: a refused CONNECT (bad credentials, not authorized) is not a session.
            log.error("broker refused the connection: %s", reason_code)
            self.connected.clear()
            return
        log.info("connected to %s:%s (session present: %s)", self._host, self._port, flags.session_present)
        client.publish(f"{self.base}/status", self._status(True), qos=1, retain=True)
        client.subscribe([(topic, 1) for topic in self.scopes])
        with self._lock:
            for sha in self._chunks:
                client.subscribe(f"{PREFIX}/bundles/{sha}/+", 1)
        self.connected.set()
        self.outbox.wake.set()
        self._work.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected.clear()
        if not self._stop.is_set():
            log.warning("disconnected from the broker (%s); serving goes on, telemetry is kept", reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        topic = msg.topic
        if topic.startswith(f"{PREFIX}/bundles/"):
            self._on_chunk(topic, msg.payload)
            return
        scope = self.scopes.get(topic)
        if scope is None:
            self._refuse("wrong-topic", f"unexpected topic {topic}")
            return
        if not msg.payload:
            return  # a cleared retained message
        try:
            payload = open_envelope(msg.payload, self.cfg.fleet_keys, scope, "desired")
            last = self.seq.seen.get(scope, -1)
            with self._lock:
                known = scope in self.desired
            if payload["seq"] == last and known:
                return  # the same desired state again (retained on resubscribe, QoS 1 duplicate): idempotent
            if payload["seq"] != last:  # equal and unknown: our own accepted state, back after a restart
                self.seq.check(scope, payload["seq"])
            models = payload.get("models")
            if not isinstance(models, dict):
                raise ControlRefused("malformed", "desired state needs a 'models' object")
        except ControlRefused as e:
            self._refuse(e.reason, str(e))
            return
        self.seq.accept(scope, payload["seq"])
        with self._lock:
            if payload["seq"] != last:
                self.rejected.clear()  # a new desired state may retry what failed before
                self.crashed.clear()
            self.desired[scope] = models
        self._work.set()

    def _refuse(self, reason: str, detail: str) -> None:
        log.warning("control message refused (%s): %s", reason, detail)
        self.refused[reason] += 1
        atomic_write(self.dir / "counters.json", json.dumps(self.refused).encode())
        self.event("control-refused", {"reason": reason, "detail": detail[:300]})

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 5 or not parts[4].isdigit():
            return
        with self._lock:
            chunks = self._chunks.get(parts[3])
        if chunks is not None and chunks.put(int(parts[4]), payload) and not chunks.missing():
            self._work.set()

    # --- telemetry -------------------------------------------------------------------

    def event(self, kind: str, data: dict[str, Any]) -> None:
        self.outbox.put("event", {"event": kind, **data})

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.cfg.telemetry_interval_s):
            try:
                models = {}
                for h in self.runtime.models():
                    models[h.name] = {"version": h.current.version, **h.current.stats.snapshot()}
                self.outbox.put("metrics", {"models": models, "outbox": self.outbox.stats()})
                self.publish_state()
            except Exception:  # one bad snapshot must not end telemetry for good
                log.exception("telemetry snapshot failed; trying again next period")

    def _send_loop(self) -> None:
        """Oldest first; a record is deleted only after its PUBACK; in order per device."""
        while not self._stop.is_set():
            if not self.connected.wait(0.5):
                continue
            batch = self.outbox.peek(50)
            if not batch:
                self.outbox.wake.wait(1.0)
                self.outbox.wake.clear()
                continue
            # Publish the whole batch (pipelined, up to 50 in flight), then delete the prefix the
            # broker acknowledged, in order. Anything sent but unacknowledged stays and is sent
            # again later: receivers drop the duplicate by its seq.
            sent = []
            for rec in batch:
                topic = f"{self.base}/events" if rec.kind == "event" else f"{self.base}/telemetry"
                sent.append((rec.seq, self.client.publish(topic, rec.message(self.cfg.device_id), qos=1)))
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

    def publish_state(self) -> None:
        if not self.connected.is_set():
            return
        self.client.publish(f"{self.base}/state", json.dumps(self.state()).encode(), qos=1, retain=True)

    def state(self) -> dict[str, Any]:
        st = device_state(self.store, self.outbox.stats(), dict(self.refused), self.cfg.device_id, self.cfg.group,
                          self.cfg.target, self.seq.seen)  # fmt: skip
        for h in self.runtime.models():
            m = st["models"].setdefault(h.name, {"version": None, "staged": [], "pending": None})
            m["serving"] = h.current.version
            m["live"] = h.current.stats.snapshot()
            m["standby"] = h.standby.version if h.standby is not None else None
            m["experiment"] = h.experiment.snapshot() if h.experiment is not None else None
        with self._lock:
            for name, outcome in self.outcomes.items():
                st["models"].setdefault(name, {"version": None, "staged": [], "pending": None})["outcome"] = outcome
        return st

    def _outcome(self, model: str, version: str, outcome: str, reason: str, figures: Any = None) -> None:
        entry = {"version": version, "outcome": outcome, "reason": reason[:300], "ts": time.time(),
                 "seqs": dict(self.seq.seen), "figures": _jsonable(_brief(figures or {}))}  # fmt: skip
        with self._lock:
            self.outcomes[model] = entry
            data = json.dumps(self.outcomes).encode()
        atomic_write(self.dir / "outcomes.json", data)

    # --- updates ---------------------------------------------------------------------

    def _wanted(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            merged: dict[str, dict[str, Any]] = {}
            group = self.desired.get(f"group:{self.cfg.group}", {})
            merged.update(group)
            merged.update(self.desired.get(self.cfg.device_id, {}))  # the device's own desired state wins
            return merged

    def _update_loop(self) -> None:
        while not self._stop.is_set():
            self._work.wait(2.0)
            self._work.clear()
            active = {m.name: m.version for m in self.store.active()}
            for name, spec in self._wanted().items():
                if self._stop.is_set():
                    return
                try:
                    self._converge(name, spec, active.get(name))
                    self._converge_extras(name, spec)
                except Exception as e:  # never let one bad desired entry stop the agent
                    log.exception("update of %s failed", name)
                    self.event("update-error", {"model": name, "error": str(e)[:300]})

    def _converge(self, name: str, spec: dict[str, Any], active: str | None) -> None:
        version = str(spec.get("version", ""))
        if not version or version == active:
            return
        ref_raw = spec.get("bundle")
        sha = ref_raw.get("sha256", "") if isinstance(ref_raw, dict) else ""
        key = (name, version, sha)
        if key in self.rejected or (name, version) in self.crashed:
            return
        try:
            path = self._installed_or_obtain(name, version, ref_raw)
            if path is None:
                return  # chunks still arriving; _work is set when the last one lands
            self.updater.stage(name, version, path, bool(spec.get("allow_downgrade")))
        except UpdateRefused as e:
            self.rejected.add(key)
            log.error("update to %s %s refused: %s", name, version, e)
            self.event("update-refused", {"model": name, "version": version, "reason": str(e)})
            self._outcome(name, version, "refused", str(e))
            self.publish_state()
            return
        self.event("update-started", {"model": name, "from": active, "to": version})
        self.publish_state()
        standby = spec.get("standby")
        keep_old = isinstance(standby, dict) and standby.get("version") == active  # blue-green: old stays warm
        result = self.updater.activate_and_watch(
            name, version, HealthPolicy.from_dict(spec.get("health")), stop=self._stop.is_set, keep_old=keep_old
        )
        if result.outcome != "committed":
            self.rejected.add(key)
        outcome = {"model": name, "from": active, "to": version, "reason": result.reason}
        self.event(f"update-{result.outcome}", {**outcome, "figures": _jsonable(result.figures)})
        self._outcome(name, version, result.outcome, result.reason, result.figures)
        self.publish_state()

    def _installed_or_obtain(self, name: str, version: str, ref_raw: Any) -> Path | None:
        """A version still in the store (the one before an update, a blue-green standby) needs no
        download: switching back to it is local. It is verified again all the same."""
        installed = self.store.bundle_path(name, version)
        if ref_raw is None and installed.exists():
            return installed  # a rollback to a version the controller never published: it is here
        ref = BundleRef.parse(ref_raw if isinstance(ref_raw, dict) else {})
        if installed.exists() and hashlib.sha256(installed.read_bytes()).hexdigest() == ref.sha256:
            return installed
        return self._obtain(ref)

    def _converge_extras(self, name: str, spec: dict[str, Any]) -> None:
        """Blue-green standby and shadow/A-B experiments beside the served version."""
        try:
            handle = self.runtime.get(name)
        except KeyError:
            return  # nothing served yet: extras wait for the main version
        standby = spec.get("standby")
        if isinstance(standby, dict) and standby.get("version") != handle.current.version:
            if handle.standby is None or handle.standby.version != standby.get("version"):
                path = self._extra_bundle(name, standby, "standby")
                if path is not None:
                    self.runtime.prepare(path)
                    self.event("standby-ready", {"model": name, "version": standby.get("version")})
                    self.publish_state()
        elif handle.standby is not None and not isinstance(standby, dict):
            self.runtime.release_standby(name)
            self.publish_state()
        exp = spec.get("experiment")
        current = handle.experiment
        if isinstance(exp, dict):
            kind, split = str(exp.get("kind", "")), exp.get("split", 0.0) or 0.0
            if kind not in ("shadow", "ab") or not isinstance(split, (int, float)) or not 0.0 <= split <= 1.0:
                self._refuse_extra(name, exp, "experiment", f"needs kind shadow|ab and a split in [0, 1], got {exp}")
                return
            split = float(split)
            same = current is not None and (current.kind, current.version, current.served, current.split) == (
                kind, exp.get("version"), handle.current.version, split if kind == "ab" else 0.0)  # fmt: skip
            if not same:
                path = self._extra_bundle(name, exp, f"experiment-{kind}")
                if path is not None:
                    ended = self.runtime.stop_experiment(name)
                    if ended is not None:
                        self.event("experiment-ended", {"model": name, "figures": ended})
                    self.runtime.start_experiment(path, kind, split)
                    self.event("experiment-started", {"model": name, "kind": kind, "version": exp.get("version")})
                    self.publish_state()
        elif current is not None:
            ended = self.runtime.stop_experiment(name)
            self.event("experiment-ended", {"model": name, "figures": ended})
            self.publish_state()

    def _extra_bundle(self, name: str, spec: dict[str, Any], what: str) -> Path | None:
        version = str(spec.get("version", ""))
        ref_raw = spec.get("bundle")
        key = (name, version, ref_raw.get("sha256", "") if isinstance(ref_raw, dict) else "")
        if key in self.rejected:
            return None
        try:
            path = self._installed_or_obtain(name, version, ref_raw)
            if path is not None:
                # Not activated, so no version order to keep; activating it later is checked then.
                self.updater.stage(name, version, path, downgrade=True)
                return self.store.bundle_path(name, version)
        except (UpdateRefused, ValueError) as e:
            self._refuse_extra(name, spec, what, str(e))
        return None

    def _refuse_extra(self, name: str, spec: dict[str, Any], what: str, reason: str) -> None:
        """Refused once and remembered: not retried until the controller signs a new desired state."""
        version = str(spec.get("version", ""))
        ref_raw = spec.get("bundle")
        key = (name, version, ref_raw.get("sha256", "") if isinstance(ref_raw, dict) else "")
        if key in self.rejected:
            return
        self.rejected.add(key)
        log.error("%s %s %s refused: %s", what, name, version, reason)
        self.event(f"{what}-refused", {"model": name, "version": version, "reason": reason[:300]})
        self._outcome(name, version, f"{what}-refused", reason)
        self.publish_state()

    def _obtain(self, ref: BundleRef) -> Path | None:
        dest = self.updater.downloads / f"{ref.sha256}.edgepkg"
        if dest.exists():
            return dest
        crash_point("download")
        if ref.url:
            return fetch_url(ref, dest)
        with self._lock:
            chunks = self._chunks.get(ref.sha256)
            if chunks is None:
                chunks = self._chunks[ref.sha256] = ChunkStore(self.updater.downloads, ref)
                if self.connected.is_set():
                    self.client.subscribe(f"{PREFIX}/bundles/{ref.sha256}/+", 1)
        if chunks.missing():
            return None
        path = chunks.assemble(dest)
        with self._lock:
            self._chunks.pop(ref.sha256, None)
        self.client.unsubscribe(f"{PREFIX}/bundles/{ref.sha256}/+")
        return path


def _brief(figures: dict[str, Any]) -> dict[str, Any]:
    """The health window's summary figures, without the per-version snapshots (kept small)."""
    return {k: v for k, v in figures.items() if k in ("error_rate", "p95_ratio", "p95_increase_ms", "drift")}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def device_state(
    store: ModelStore, outbox: dict[str, int], refused: dict[str, int], device: str, group: str, target: str,
    seqs: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    models = {}
    for m in store.active():
        models[m.name] = {
            "version": m.version,
            "staged": [v for v in store.installed_versions(m.name) if v != m.version],
            "pending": store.pending(m.name),
        }
    return {"device": device, "group": group, "target": target, "models": models, "outbox": outbox,
            "control_refused": refused, "last_rollback": store.last_rollback(), "desired_seq": seqs,
            "ts": time.time()}  # fmt: skip
