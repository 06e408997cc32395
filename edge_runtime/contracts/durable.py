"""Durable file writes, the one way both sides put a file on disk that must survive power loss.

``atomic_write``: temp file in the same directory, write, fsync, rename over the target, fsync the
directory. A reader (or the process after a kill -9 or a power cut) sees the old file or the new
one, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# --- state files that may be found corrupt ------------------------------------------------------
#
# A device has nobody beside it: a state file that cannot be read (a bit flip, a torn write on a
# card without power-loss protection, garbage) must never stop it. It is moved aside (kept for a
# post-mortem as NAME.corrupt-UNIXTIME), reported loudly, and rebuilt from what is left. Every such
# event is kept here until someone (the agent) reports it to the fleet.

log = logging.getLogger(__name__)
_reports: list[dict[str, object]] = []
_reports_lock = threading.Lock()
_inspect_only = threading.local()


class inspect_only:
    """Within it, corrupt files are reported but left where they are: `edgert status` looks at a
    state dir without changing it (the daemon, at its next start, moves them aside)."""

    def __enter__(self) -> None:
        _inspect_only.on = True

    def __exit__(self, *exc: object) -> None:
        _inspect_only.on = False


def report_corrupt(path: Path, reason: str, rebuilt: str) -> Path | None:
    """Move a corrupt state file aside and remember the event; returns where it went (None if it
    could not be moved, e.g. a read-only disk: it is then simply not trusted)."""
    aside: Path | None = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    if getattr(_inspect_only, "on", False):
        log.error("state file %s is corrupt (%s); the daemon will move it aside: %s", path, reason, rebuilt)
        return None
    try:
        os.replace(path, aside)  # type: ignore[arg-type]
    except OSError as e:
        log.error("cannot move corrupt %s aside (%s); ignoring its content", path, e)
        aside = None
    log.error("state file %s is corrupt (%s): moved aside to %s; %s", path, reason, aside, rebuilt)
    with _reports_lock:
        _reports.append({"file": str(path), "reason": reason[:200], "moved_to": str(aside) if aside else None,
                         "rebuilt": rebuilt, "ts": time.time()})  # fmt: skip
    return aside


def take_corruption_reports() -> list[dict[str, object]]:
    with _reports_lock:
        out = list(_reports)
        _reports.clear()
    return out


def corruption_count() -> int:
    with _reports_lock:
        return len(_reports)


def read_json_file(path: Path, check: Callable[[Any], T], default: Callable[[], T], rebuilt: str) -> T:
    """A small JSON state file: missing -> ``default()``; unreadable, not JSON, too deep, or refused
    by ``check`` -> moved aside, reported, ``default()``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return default()
    except OSError as e:
        log.error("cannot read %s (%s); %s", path, e, rebuilt)
        return default()
    try:
        if len(raw) > 16 << 20:
            raise ValueError(f"{len(raw)} bytes is far more than a state file holds")
        return check(json.loads(raw))
    except (ValueError, TypeError, KeyError, RecursionError, UnicodeDecodeError) as e:
        report_corrupt(path, f"{type(e).__name__}: {e}", rebuilt)
        return default()
