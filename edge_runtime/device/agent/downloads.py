"""Bundle downloads on the device: MQTT chunks (each hashed, kept on disk, so a transfer resumes
after a disconnect or a restart) or a URL (http(s)/file). Every byte is checked against the
signed BundleRef before the file is handed to the updater."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edge_runtime.contracts.durable import atomic_write, fsync_dir
from edge_runtime.contracts.fleet import BundleRef, chunk_topic

log = logging.getLogger(__name__)


class UpdateRefused(Exception):
    """The update was refused before the active model was touched."""


class ChunkStore:
    """Chunks of one bundle on disk, each verified against its hash."""

    def __init__(self, root: Path, ref: BundleRef) -> None:
        if not ref.chunks:
            raise UpdateRefused("bundle reference names no MQTT chunks")
        self.ref = ref
        self.dir = root / ref.sha256
        self.dir.mkdir(parents=True, exist_ok=True)

    def have(self, index: int) -> bool:
        return (self.dir / f"{index}.chunk").exists()

    def missing(self) -> list[int]:
        return [i for i in range(len(self.ref.chunks)) if not self.have(i)]

    def put(self, index: int, data: bytes) -> bool:
        if not 0 <= index < len(self.ref.chunks):
            return False
        if hashlib.sha256(data).hexdigest() != self.ref.chunks[index]:
            log.warning("chunk %d of %s has a wrong hash; dropped", index, self.ref.sha256[:12])
            return False
        if not self.have(index):
            atomic_write(self.dir / f"{index}.chunk", data)
        return True

    def assemble(self, dest: Path) -> Path:
        tmp = dest.with_name(dest.name + ".tmp")
        h = hashlib.sha256()
        with open(tmp, "wb") as out:
            for i in range(len(self.ref.chunks)):
                data = (self.dir / f"{i}.chunk").read_bytes()
                h.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != self.ref.sha256 or tmp.stat().st_size != self.ref.size:
            tmp.unlink()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise UpdateRefused("assembled bundle does not match its whole-file sha256/size")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        shutil.rmtree(self.dir, ignore_errors=True)
        return dest


class DownloadInterrupted(Exception):
    """A transient failure (DNS, refused or reset connection, timeout, HTTP 5xx/429): the partial
    download is kept and resumed later with an HTTP Range request; never counted as a refusal."""


class DownloadSuperseded(Exception):
    """A newer desired state made this download pointless (a rollback, another version)."""


def fetch_url(
    ref: BundleRef,
    dest: Path,
    timeout: float = 10.0,
    deadline_s: float = 300.0,
    cancelled: Callable[[], bool] = lambda: False,
) -> Path:
    """Download ``ref.url`` to ``dest``, checking size and sha256 against the signed reference.

    A partial file (``dest.part``) is resumed with ``Range``; ``timeout`` bounds each read,
    ``deadline_s`` the whole attempt, and ``cancelled`` is checked between blocks so a newer
    desired state is never stuck behind a slow bundle store."""
    if not ref.url:
        raise UpdateRefused("bundle reference names no URL")
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if have > ref.size:
        part.unlink()
        have = 0
    request = urllib.request.Request(ref.url)
    if have and ref.url.startswith(("http://", "https://")):
        request.add_header("Range", f"bytes={have}-")
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status = getattr(r, "status", 200)
            mode = "ab" if have and status == 206 else "wb"  # a server ignoring Range sends it all
            n = have if mode == "ab" else 0
            with open(part, mode) as out:
                while chunk := r.read(1 << 20):
                    n += len(chunk)
                    if n > ref.size:
                        out.close()
                        part.unlink(missing_ok=True)
                        raise UpdateRefused(f"{ref.url} is larger than the {ref.size} bytes announced")
                    out.write(chunk)
                    if cancelled():
                        raise DownloadSuperseded(f"{ref.url}: a newer desired state arrived")
                    if time.monotonic() - started > deadline_s:
                        raise DownloadInterrupted(f"{ref.url}: not complete within {deadline_s:.0f} s ({n} bytes)")
                out.flush()
                os.fsync(out.fileno())
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code in (408, 429):
            raise DownloadInterrupted(f"{ref.url}: HTTP {e.code} (temporary)") from e
        raise UpdateRefused(f"cannot fetch {ref.url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:  # DNS, refused, reset, timeout: try again later
        raise DownloadInterrupted(f"{ref.url}: {getattr(e, 'reason', e)}") from e
    h = hashlib.sha256()
    with open(part, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    size = part.stat().st_size
    if size < ref.size:
        raise DownloadInterrupted(f"{ref.url}: connection ended after {size} of {ref.size} bytes")
    if h.hexdigest() != ref.sha256:
        part.unlink(missing_ok=True)
        raise UpdateRefused(
            f"{ref.url}: {size} bytes, sha256 {h.hexdigest()[:12]}: does not match the signed reference"
        )
    os.replace(part, dest)
    return dest


class Downloads:
    """The device's downloads folder and the chunk transfers in progress.

    Owns: which bundles are being received over MQTT (and their subscriptions). Never verifies a
    signature or touches the store: the updater does that with what ``obtain`` returns.
    """

    def __init__(
        self,
        root: Path,
        subscribe: Callable[[str], None],
        unsubscribe: Callable[[str], None],
        on_complete: Callable[[], None],
    ) -> None:
        self.root = root
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # read-only or full: downloads fail (and are reported) when one is needed
            log.error("cannot create %s: %s", root, e)
        self._subscribe, self._unsubscribe, self._on_complete = subscribe, unsubscribe, on_complete
        self._chunks: dict[str, ChunkStore] = {}
        self._failed: dict[str, str] = {}  # sha256 -> why its transfer was abandoned
        self._lock = threading.Lock()

    def discard(self, sha256: str) -> None:
        """Drop everything downloaded for one bundle (superseded, or refused)."""
        self.clean(keep=set(), only={sha256}, older_than_s=0.0)

    def clean(self, keep: set[str], only: set[str] | None = None, older_than_s: float = 600.0) -> int:
        """Remove downloads (partial or whole) and chunk folders of bundles not in ``keep`` that
        were last touched more than ``older_than_s`` ago: a failed or abandoned transfer must not
        keep the disk full. The grace period lets a restarted agent hear its retained desired
        state (and resume a transfer) before anything is judged unwanted."""
        removed = 0
        if not self.root.is_dir():
            return 0
        now = time.time()
        for p in self.root.iterdir():
            sha = p.name.split(".", 1)[0]
            if sha in keep or (only is not None and sha not in only):
                continue
            try:
                if now - p.stat().st_mtime < older_than_s:
                    continue
            except OSError:
                continue
            try:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed += 1
            except OSError as e:
                log.error("cannot remove %s: %s", p, e)
        return removed

    def in_progress(self) -> list[str]:
        with self._lock:
            return list(self._chunks)

    def obtain(
        self,
        ref: BundleRef,
        crash_point: Callable[[str], None] = lambda step: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Path | None:
        """The bundle file, or None while its chunks are still arriving (``on_complete`` fires
        when the last one lands)."""
        dest = self.root / f"{ref.sha256}.edgepkg"
        if dest.exists():
            return dest
        crash_point("download")
        if ref.url:
            return fetch_url(ref, dest, cancelled=cancelled)
        with self._lock:
            failed = self._failed.pop(ref.sha256, None)
            if failed is not None:  # a chunk could not be written (disk full): start over later
                raise DownloadInterrupted(failed)
            chunks = self._chunks.get(ref.sha256)
            if chunks is None:
                chunks = self._chunks[ref.sha256] = ChunkStore(self.root, ref)
                self._subscribe(chunk_topic(ref.sha256, "+"))
        if chunks.missing():
            return None
        try:
            path = chunks.assemble(dest)
        except OSError as e:
            self._abandon(ref.sha256, f"cannot assemble the bundle: {e}")
            raise DownloadInterrupted(f"cannot assemble {ref.sha256[:12]}: {e}") from e
        with self._lock:
            self._chunks.pop(ref.sha256, None)
        self._unsubscribe(chunk_topic(ref.sha256, "+"))
        return path

    def on_chunk(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 5 or not parts[4].isdigit():
            return
        with self._lock:
            chunks = self._chunks.get(parts[3])
        if chunks is None:
            return
        try:
            complete = chunks.put(int(parts[4]), payload) and not chunks.missing()
        except OSError as e:  # disk full: free what this transfer holds, back off, try again later
            self._abandon(parts[3], f"cannot store a chunk: {e}")
            self._on_complete()  # wake the updater: it reports the interruption and backs off
            return
        if complete:
            self._on_complete()

    def _abandon(self, sha256: str, reason: str) -> None:
        log.error("download of %s abandoned: %s; its chunks are removed", sha256[:12], reason)
        with self._lock:
            self._chunks.pop(sha256, None)
            self._failed[sha256] = reason
        self._unsubscribe(chunk_topic(sha256, "+"))
        self.discard(sha256)
