"""`edgert serve`: load every active model, warm it, then serve until SIGTERM.

Ready (/v2/health/ready) only after every model is warm. On SIGTERM or SIGINT: stop
accepting connections, let queued and in-flight requests finish, exit 0. No network is
needed at any point: the daemon serves from its state directory alone.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_runtime.contracts.bundle import load_public_keys
from edge_runtime.contracts.targets import host_lacks
from edge_runtime.device.agent.updater import Updater
from edge_runtime.device.config import ServeConfig
from edge_runtime.device.http_server import HttpServer, ServerState
from edge_runtime.device.sd_notify import Notifier, Watchdog, loop_progressing, watchdog_interval
from edge_runtime.device.sources import FrameSource
from edge_runtime.device.status_page import StatusPage
from edge_runtime.serving.cache import PredictionCache
from edge_runtime.serving.results import ResultHub
from edge_runtime.serving.runtime import Runtime
from edge_runtime.serving.store import ModelStore

log = logging.getLogger(__name__)


class Daemon:
    """`edgert serve`: wires the store, the runtime, the HTTP servers, the frame sources, the agent
    and the watchdog together, and runs them until a signal.

    Owns start-up order (liveness first, readiness once every model is warm) and the drain on
    SIGTERM. Never decides versions itself: SIGHUP and the agent go through the Updater."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.store = ModelStore(config.state_dir)
        self.runtime = Runtime(
            self.trusted_keys(),
            threads=config.threads,
            batching=config.batching.settings(),
            spin=config.spin,
            delegate=str(config.delegate) if config.delegate else None,
        )
        self.updater = Updater(self.store, self.runtime, self.trusted_keys, config.target)
        self.hub = ResultHub()
        self.sources: list[FrameSource] = []
        self.state = ServerState(
            self.runtime, config.max_body_bytes, self.hub, config.max_json_body_bytes,
            config.http_idle_timeout_s, config.http_request_timeout_s, config.max_connections,
            source_names={s.name for s in config.sources},
        )  # fmt: skip
        self.state.source_errors = lambda: {s.cfg.name: s.last_error for s in self.sources}
        if config.status_page:
            self.state.status = StatusPage(
                self.runtime, self.hub, lambda: self.sources, lambda: self.agent, self.state.ready.is_set
            )
        self.http = HttpServer(self.state, config.host, config.port, config.uds)
        self.grpc: Any = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self.notifier = Notifier()
        self.agent: Any = None
        self.recovered: list[dict[str, Any]] = []
        self.load_failures: dict[str, str] = {}  # "model version" -> why it could not load
        self.agent_error = ""
        self.agent_ok = True
        self.watchdog: Watchdog | None = None

    def trusted_keys(self) -> list[Ed25519PublicKey]:
        extra = [d for d in self.config.trust_dirs if d.is_dir()]
        return self.store.trusted_keys() + (load_public_keys(extra) if extra else [])

    @property
    def port(self) -> int:
        return self.http.port

    def load_models(self) -> None:
        self.recovered = self.store.recover()
        for entry in self.recovered:
            log.warning("rolled back %s %s -> %s: %s", entry["model"], entry["from"], entry["to"], entry["reason"])
        installed = self.store.active()
        if not installed:
            log.warning("no models installed in %s (edgert install BUNDLE --state-dir ...)", self.store.root)
        for model in installed:
            self._load_model(model.name, model.version)

    def _load_model(self, name: str, active: str) -> None:
        """Each model loads on its own: one that cannot load (a bit flip, a bundle for another
        target, a missing key) is reported and the newest other installed version that loads is
        served instead (the pointer follows, the rollback is recorded). A model with no loadable
        version is reported and skipped: the daemon still serves the others, and the agent still
        joins the fleet so it can be repaired remotely."""
        override = self.config.models.get(name)
        settings = override.batching.settings() if override and override.batching else None
        cache = (
            PredictionCache(override.cache.entries, override.cache.max_age_s) if override and override.cache else None
        )
        candidates = [active] + [v for v in self.store.installed_versions(name) if v != active]
        first_error = ""
        for version in candidates:
            self.notifier.status(f"loading and warming {name} {version}")
            try:
                manifest = self.runtime.load(self.store.bundle_path(name, version), settings, cache).manifest
                if manifest.target != self.config.target:
                    self.runtime.unload(name)
                    raise ValueError(f"bundle targets {manifest.target}, this device is {self.config.target}")
                lacks = host_lacks(manifest.target)
                if lacks:  # it would load and answer wrongly (saturating kernels): not served
                    self.runtime.unload(name)
                    raise ValueError(lacks)
            except Exception as e:
                log.error("cannot load %s %s: %s", name, version, e)
                self.load_failures[f"{name} {version}"] = str(e)[:300]
                first_error = first_error or f"{version} failed to load at start: {e}"
                continue
            if version != active:
                log.error("serving %s %s instead of %s, which cannot load", name, version, active)
                self.store.activate(name, version)
                self.store.record_rollback(
                    {"model": name, "from": active, "to": version, "reason": first_error[:300], "ts": time.time()}
                )
            return
        log.error("no installed version of %s can be loaded; it is not served", name)

    def reload(self) -> None:
        """Converge on the store's active pointers (SIGHUP): hot-swap changed versions, load new
        models; a version that cannot load is reported and the serving one kept."""
        self.runtime.trusted_keys = self.trusted_keys()
        changed = self.updater.align()
        log.info("reload: %s", ", ".join(changed) or "nothing changed")

    def start(self) -> None:
        self.http.start()
        if self.config.grpc_port is not None:
            try:
                from edge_runtime.device.grpc_server import GrpcServer
            except ImportError as e:
                raise RuntimeError(f"grpc_port needs the grpc extra: pip install 'edge-runtime[grpc]' ({e})") from e
            self.grpc = GrpcServer(self.http, self.config.host, self.config.grpc_port)
            self.grpc.start()
        # Liveness answers while models load; readiness only once every model is warm.
        self.load_models()
        for cfg in self.config.sources:
            source = FrameSource(cfg, self.runtime, self.hub)
            source.start()
            self.sources.append(source)
        if self.config.mqtt is not None:
            try:
                self.agent = self._make_agent()
                self.agent.start()
            except Exception as e:  # serve anyway: an unreachable fleet is no reason to stop answering
                self.agent = None
                self.agent_error = f"{type(e).__name__}: {e}"
                log.error("the fleet agent could not start (%s); serving offline", e)
                log.debug("the fleet agent's start", exc_info=True)
        supervisor = threading.Thread(target=self._supervise, name="supervisor", daemon=True)
        supervisor.start()
        self._threads.append(supervisor)
        self.state.ready.set()
        where = [f"http://{self.config.host}:{self.port}"] + ([f"unix:{self.config.uds}"] if self.config.uds else [])
        if self.grpc is not None:
            where.append(f"grpc://{self.config.host}:{self.grpc.port}")
        summary = f"ready, {len(self.runtime.models())} model(s) warm, serving on {', '.join(where)}"
        self.notifier.ready(summary)  # only now: every model is loaded and warmed
        interval = watchdog_interval()
        if interval:
            self.watchdog = Watchdog(self.notifier, interval, self._progressing)
            self.watchdog.start()
        print(f"edgert: {summary}", flush=True)

    def _make_agent(self) -> Any:
        import random

        from edge_runtime.device.agent.session import Agent, AgentConfig

        m = self.config.mqtt
        assert m is not None
        cfg = AgentConfig(
            url=m.url, device_id=m.device_id, group=m.group, fleet_keys=load_public_keys([m.fleet_key]),
            target=self.config.target, username=m.username or m.device_id,
            password=m.password_file.read_text().strip() if m.password_file else None,
            tls_ca=str(m.tls_ca) if m.tls_ca else None, tls_cert=str(m.tls_cert) if m.tls_cert else None,
            tls_key=str(m.tls_key) if m.tls_key else None, telemetry_interval_s=m.telemetry_interval_s,
            outbox_max_bytes=m.outbox_max_bytes,
        )  # fmt: skip
        agent = Agent(cfg, self.runtime, self.store, self.updater, recovered=self.recovered)
        if m.sample_results > 0:
            share = m.sample_results

            def sample(result: dict[str, Any]) -> None:
                if random.random() < share:
                    agent.outbox.put("result", result)

            self.hub.on_result(sample)
        return agent

    def _progressing(self, within: float) -> bool:
        """Fed to the watchdog: every batcher progresses, and the fleet agent is alive (or could
        be restarted). A dead agent must not hide behind an HTTP API that still answers."""
        serving = loop_progressing([h.last_progress for h in self.runtime.models()], within)
        if not self.agent_ok:
            log.error("the fleet agent cannot recover: withholding watchdog pings so systemd restarts the daemon")
        return serving and self.agent_ok

    def _supervise(self) -> None:
        """Every 2 s: the agent restarts any dead worker; ``agent_ok`` goes false when it cannot."""
        while not self._stop.wait(2.0):
            agent = self.agent
            if agent is None:
                continue
            try:
                self.agent_ok = bool(agent.supervise())
            except Exception:
                log.exception("supervising the fleet agent failed")
                self.agent_ok = False

    def stop(self) -> None:
        self.state.stopping.set()
        self.notifier.stopping()
        if self.agent is not None:
            self.agent.stop()
        if self.watchdog is not None:
            self.watchdog.stop()
        for source in self.sources:
            source.stop()
        self.http.stop_accepting()  # requests already read are answered (with Connection: close)
        for h in self.runtime.models():
            h.batcher.close(drain=True)
        if self.grpc is not None:
            self.grpc.stop()
        self.http.stop()
        self.runtime.close()
        self._stop.set()

    def run(self) -> int:
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: draining and stopping", signum)
            threading.Thread(target=self.stop, daemon=True).start()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            threading.Thread(target=self.reload, name="reload", daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_hup)
        self.start()
        self._stop.wait()
        print("edgert: stopped cleanly", flush=True)
        return 0
