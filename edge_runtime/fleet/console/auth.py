"""Who may look and who may act.

- Reading: free on loopback (the operator's own machine), a logged-in session anywhere else.
- Acting (abort, roll back, promote, resume): always a logged-in session, and each action carries
  a one-time ticket the server issued to that session for that action on that rollout. A ticket
  is spent on first use: a replayed request (the same body sent again) does nothing; a ticket
  made up, another session's, expired or for another action or rollout does nothing.
- Logging in: the token (or password) from ``--token-file``, compared in constant time; the
  session is an HttpOnly, SameSite=Strict cookie, so another site's page cannot act with it.

The signing key never leaves the server: the browser holds a session, the server signs.
Every refusal is counted by reason (shown on the page and in ``/metrics``).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

SESSION_COOKIE = "edgert_console"
SESSION_S = 12 * 3600
TICKET_S = 300
MAX_SESSIONS = 256
MAX_TICKETS = 64  # per session: outstanding confirmations


@dataclass
class Session:
    id: str
    created: float
    tickets: dict[str, tuple[str, int, float]] = field(default_factory=dict)  # ticket -> (action, rollout, expires)


class Gate:
    def __init__(self, token: str, loopback: bool) -> None:
        if len(token) < 16:
            raise ValueError("the console token must be at least 16 characters (a password file works too)")
        self._token = token.encode()
        self.loopback = loopback
        self._sessions: dict[str, Session] = {}
        self._spent: dict[str, float] = {}  # ticket -> when spent (kept until it would have expired)
        self._lock = threading.Lock()
        self.refused: dict[str, int] = {}

    def refuse(self, reason: str) -> None:
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1

    # --- sessions ----------------------------------------------------------------------

    def login(self, token: str) -> str | None:
        if not hmac.compare_digest(token.strip().encode(), self._token):
            self.refuse("bad_token")
            return None
        now = time.time()
        with self._lock:
            self._expire(now)
            if len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[min(self._sessions, key=lambda s: self._sessions[s].created)]
            sid = secrets.token_urlsafe(32)
            self._sessions[sid] = Session(sid, now)
        return sid

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def session(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            s = self._sessions.get(sid)
            if s is not None and time.time() - s.created > SESSION_S:
                del self._sessions[sid]
                return None
            return s

    def can_read(self, session: Session | None) -> bool:
        return self.loopback or session is not None

    # --- action tickets ------------------------------------------------------------------

    def issue(self, session: Session, action: str, rollout: int) -> str:
        ticket = secrets.token_urlsafe(24)
        now = time.time()
        with self._lock:
            session.tickets = {t: v for t, v in session.tickets.items() if v[2] > now}
            while len(session.tickets) >= MAX_TICKETS:
                session.tickets.pop(next(iter(session.tickets)))
            session.tickets[ticket] = (action, rollout, now + TICKET_S)
        return ticket

    def redeem(self, session: Session | None, ticket: str, action: str, rollout: int) -> tuple[int, str] | None:
        """None when the ticket is good (and now spent); else (HTTP status, why)."""
        now = time.time()
        with self._lock:
            self._expire(now)
            if ticket in self._spent:
                reason, status, why = "replayed", 409, "this action request was already carried out once (a replay)"
            elif session is None:
                reason, status, why = "no_session", 403, "actions need a logged-in session (the console token)"
            elif ticket not in session.tickets:
                reason, status, why = "bad_ticket", 403, "the action ticket is not one this session was given"
            else:
                want_action, want_rollout, expires = session.tickets.pop(ticket)
                self._spent[ticket] = expires
                if expires < now:
                    reason, status, why = "expired", 403, "the confirmation expired; confirm again"
                elif (want_action, want_rollout) != (action, rollout):
                    reason, status, why = "bad_ticket", 403, "the ticket was given for another action or rollout"
                else:
                    return None
            self.refused[reason] = self.refused.get(reason, 0) + 1
        return status, why

    def _expire(self, now: float) -> None:
        self._spent = {t: e for t, e in self._spent.items() if e > now}
        for sid in [s for s, v in self._sessions.items() if now - v.created > SESSION_S]:
            del self._sessions[sid]
