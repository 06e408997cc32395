"""`edgert fleet console`: the operator's web page, served by the controller's own process.

Why this stack: the standard library's threading HTTP server, Jinja2 templates (autoescaped),
plots drawn as SVG on the server, and one small hand-written script for live updates (Server-Sent
Events) and confirmations. No front-end build for CI to run, nothing fetched at run time (fleets
are often offline), and a handful of operators per console is what it is sized for: a thread per
connection, capped (``MAX_CONNECTIONS``; past the cap a client gets 503 at once), with an idle
timeout so a silent socket cannot hold a thread. The device's own HTTP server is a different
animal (one event loop, thousands of requests a second); this one serves people.

Live updates: ``/events`` is a Server-Sent Events stream per open page. It re-renders the page's
sections when a device message arrives (at most every ``MIN_PUSH_S``) and at least every
``HEARTBEAT_S`` (decisions written by another controller process, "seen 3 s ago" texts), and
sends only the sections that changed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
import threading
import time
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from edge_runtime.fleet.console.actions import ACTIONS, Actions
from edge_runtime.fleet.console.auth import SESSION_COOKIE, SESSION_S, Gate, Session
from edge_runtime.fleet.console.history import History
from edge_runtime.fleet.console.pages import NotFound, Pages
from edge_runtime.fleet.controller import Controller, FleetError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
STATIC_TYPES = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
MAX_CONNECTIONS = 64
MAX_BODY = 4096
IDLE_S = 20.0
MIN_PUSH_S = 0.5
HEARTBEAT_S = 2.0
SECURITY_HEADERS = {
    # Scripts only from this server (no inline script can run even if something slipped through
    # escaping); inline style attributes are the version colours.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # (no-referrer makes the browser send Origin: null)
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ConsoleApp:
    """Everything a request handler needs: the controller, the gate, the pages, the actions."""

    def __init__(self, ctl: Controller, gate: Gate, broker: str, state: Path, sample_period: float = 2.0) -> None:
        self.ctl, self.gate = ctl, gate
        self.history = History(ctl.link, ctl.db, sample_period)
        self.actions = Actions(ctl)
        self.pages = Pages(ctl, self.history, lambda: ctl.link.key is not None)
        self.pages.driving = self.actions.driving
        self.broker, self.state = broker, state
        self.stopping = threading.Event()
        self.counters: dict[str, int] = {"requests": 0, "events_sent": 0, "render_errors": 0, "busy": 0}
        self.streams = 0
        self._lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def start(self) -> None:
        self.history.start()
        threading.Thread(target=self._watch, name="console-watch", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.actions.stop()
        self.history.stop()

    def _watch(self) -> None:
        """A shadow or A/B rollout that is observing has no driver: the console, a controller with
        the key, judges its automatic abort as `fleet status` does whenever it looks."""
        while not self.stopping.wait(self.history.period):
            if self.ctl.link.key is None:
                continue
            try:
                for r in self.ctl.db.rollouts(active_only=True):
                    if r.status == "observing" and not self.actions.driving(r.id):
                        self.ctl.step(r.id)
            except Exception:  # a busy state file, a broker hiccup: the next tick tries again
                self.count("watch_errors")
                log.exception("watching observing rollouts failed")

    def context(self, session: Session | None, path: str) -> dict[str, Any]:
        return {
            "session": session is not None,
            "signing": self.ctl.link.key is not None,
            "broker": self.broker,
            "state": str(self.state),
            "refused": ", ".join(f"{k} {n}" for k, n in sorted(self.gate.refused.items())),
            "path": path,
        }

    def metrics(self) -> str:
        lines = ["# HELP edgert_console_refused_total requests the console refused, by reason",
                 "# TYPE edgert_console_refused_total counter"]  # fmt: skip
        lines += [f'edgert_console_refused_total{{reason="{k}"}} {n}' for k, n in sorted(self.gate.refused.items())]
        for k, n in sorted(self.counters.items()):
            lines += [f"# TYPE edgert_console_{k}_total counter", f"edgert_console_{k}_total {n}"]
        lines += ["# TYPE edgert_console_streams gauge", f"edgert_console_streams {self.streams}"]
        lines += ["# TYPE edgert_console_devices gauge", f"edgert_console_devices {len(self.ctl.link.group(None))}"]
        return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    server: ConsoleServer
    timeout = IDLE_S
    server_version = "edgert-console"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    @property
    def app(self) -> ConsoleApp:
        return self.server.app

    # --- helpers -----------------------------------------------------------------------

    def _session(self) -> Session | None:
        raw = self.headers.get("Cookie")
        if not raw:
            return None
        try:
            jar = SimpleCookie(raw)
        except Exception:
            return None
        morsel = jar.get(SESSION_COOKIE)
        return self.app.gate.session(morsel.value if morsel else None)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        self._send(status, json.dumps(doc).encode(), "application/json")

    def _error(self, status: int, message: str, reason: str | None = None) -> None:
        if reason:
            self.app.gate.refuse(reason)
        self._json(status, {"error": message})

    def _redirect(self, where: str, headers: dict[str, str] | None = None) -> None:
        self._send(303, b"", "text/plain", {"Location": where, **(headers or {})})

    def _same_origin(self) -> bool:
        """A browser names the page a POST comes from; it must be this console."""
        origin = self.headers.get("Origin")
        if origin is None or origin == "null":
            return origin is None
        return urlsplit(origin).netloc == (self.headers.get("Host") or "")

    def _body(self) -> bytes | None:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._error(411, "a Content-Length is required", "bad_request")
            return None
        if int(length) > MAX_BODY:
            self._error(413, f"body over {MAX_BODY} bytes", "bad_request")
            return None
        return self.rfile.read(int(length))

    # --- GET ---------------------------------------------------------------------------

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.app.count("requests")
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=False))
        path = url.path
        if path == "/healthz":
            return self._send(200, b"ok\n", "text/plain")
        if path == "/favicon.ico":
            return self._send(204, b"", "image/x-icon")
        if path.startswith("/static/"):
            name = path[len("/static/") :]
            if name not in STATIC_TYPES:
                return self._error(404, f"no static file {name!r}")
            return self._send(200, (STATIC / name).read_bytes(), STATIC_TYPES[name], {"Cache-Control": "max-age=60"})
        if path == "/login":
            if "token" in query:
                return self._login(query["token"])
            return self._send(200, self._login_page(), "text/html; charset=utf-8")
        if path == "/logout":
            self.app.gate.logout(self._cookie_sid())
            return self._redirect(
                "/", {"Set-Cookie": f"{SESSION_COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"}
            )
        session = self._session()
        if not self.app.gate.can_read(session):
            self.app.gate.refuse("not_logged_in")
            if path in ("/events", "/metrics"):
                return self._error(401, "log in first: this console is not on loopback")
            return self._redirect("/login")
        if path == "/metrics":
            return self._send(200, self.app.metrics().encode(), "text/plain; version=0.0.4")
        if path == "/events":
            return self._events(query, session)
        try:
            html = self.app.pages.render_page(path, query, self.app.context(session, path))
        except NotFound:
            return self._send(404, f"nothing at {path}\n".encode(), "text/plain; charset=utf-8")
        except Exception as e:  # counted and logged; the console keeps serving
            self.app.count("render_errors")
            log.exception("rendering %s failed", path)
            return self._send(500, f"this page failed: {type(e).__name__}: {e}\n".encode(), "text/plain")
        self._send(200, html.encode(), "text/html; charset=utf-8")

    def _cookie_sid(self) -> str | None:
        s = self._session()
        return s.id if s else None

    def _login_page(self, message: str = "") -> bytes:
        return self.app.pages.env.get_template("login.html").render(message=message).encode()

    def _login(self, token: str) -> None:
        sid = self.app.gate.login(token)
        if sid is None:
            return self._send(403, self._login_page("that token is not this console's"), "text/html; charset=utf-8")
        cookie = f"{SESSION_COOKIE}={sid}; Max-Age={SESSION_S}; Path=/; HttpOnly; SameSite=Strict"
        self._redirect("/", {"Set-Cookie": cookie})

    def _events(self, query: dict[str, str], session: Session | None) -> None:
        path = query.pop("path", "/")
        ctx = self.app.context(session, path)
        try:
            self.app.pages.page(path, query)
        except NotFound:
            return self._send(404, f"nothing at {path}\n".encode(), "text/plain; charset=utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        link = self.app.ctl.link
        sent: dict[str, str] = {}
        generation = -1
        with self.app._lock:
            self.app.streams += 1
        try:
            while not self.app.stopping.is_set():
                t0 = time.monotonic()
                try:
                    ctx["refused"] = self.app.context(session, path)["refused"]
                    sections = self.app.pages.render_sections(path, query, ctx)
                except NotFound:
                    break
                except Exception:  # one bad render (a state mid-write) must not end the stream
                    self.app.count("render_errors")
                    log.exception("rendering %s for the live stream failed", path)
                    sections = {}
                changed = {k: v for k, v in sections.items() if sent.get(k) != v}
                msg = json.dumps({"ts": time.time(), "sections": changed})
                self.wfile.write(f"data: {msg}\n\n".encode())
                self.wfile.flush()
                self.app.count("events_sent")
                sent.update(changed)
                generation = link.wait_change(generation, HEARTBEAT_S)
                rest = MIN_PUSH_S - (time.monotonic() - t0)
                if rest > 0 and self.app.stopping.wait(rest):
                    break
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError):
            pass  # the page was closed
        finally:
            with self.app._lock:
                self.app.streams -= 1
            self.close_connection = True

    # --- POST --------------------------------------------------------------------------

    def do_POST(self) -> None:
        self.app.count("requests")
        path = urlsplit(self.path).path
        if not self._same_origin():
            return self._error(403, "cross-site request refused", "cross_site")
        body = self._body()
        if body is None:
            return
        if path == "/login":
            form = dict(parse_qsl(body.decode("utf-8", "replace")))
            return self._login(form.get("token", ""))
        if path not in ("/actions/ticket", "/actions"):
            return self._error(404, f"nothing to POST at {path}")
        try:
            doc = json.loads(body)
            action, rollout = doc["action"], doc["rollout"]
            if action not in ACTIONS or not isinstance(rollout, int) or isinstance(rollout, bool):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            return self._error(
                400,
                f'expected JSON {{"action": one of {list(ACTIONS)}, "rollout": ID'
                + (', "ticket": TICKET}' if path == "/actions" else "}"),
                "bad_request",
            )
        session = self._session()
        if path == "/actions/ticket":
            if session is None:
                return self._error(403, "actions need a logged-in session (the console token)", "no_session")
            return self._json(200, {"ticket": self.app.gate.issue(session, action, rollout)})
        ticket = doc.get("ticket")
        if not isinstance(ticket, str):
            return self._error(400, "the action has no ticket: ask /actions/ticket first", "bad_request")
        refused = self.app.gate.redeem(session, ticket, action, rollout)
        if refused is not None:
            return self._error(refused[0], refused[1])
        try:
            message = self.app.actions.run(action, rollout)
        except FleetError as e:
            return self._error(409, str(e), "action_refused")
        except Exception as e:  # the console keeps serving; the rollout's state is in the state file
            log.exception("action %s on rollout %d failed", action, rollout)
            return self._error(500, f"{action} failed: {type(e).__name__}: {e}", "action_failed")
        log.info("console action: %s rollout %d: %s", action, rollout, message)
        self._json(200, {"message": message})


class ConsoleServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: ConsoleApp) -> None:
        self.app = app
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.app.count("busy")
            body = b"the console is at its connection limit; try again\n"
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()
