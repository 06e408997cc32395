"""Bundle downloads on the device: MQTT chunks (each hashed, kept on disk, so a transfer resumes
after a disconnect or a restart) or a URL (http(s)/file). Every byte is checked against the
signed BundleRef before the file is handed to the updater."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
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


def fetch_url(ref: BundleRef, dest: Path, timeout: float = 60.0) -> Path:
    if not ref.url:
        raise UpdateRefused("bundle reference names no URL")
    tmp = dest.with_name(dest.name + ".tmp")
    h, n = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(ref.url, timeout=timeout) as r, open(tmp, "wb") as out:
            while chunk := r.read(1 << 20):
                n += len(chunk)
                if n > ref.size:
                    raise UpdateRefused(f"{ref.url} is larger than the {ref.size} bytes announced")
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UpdateRefused(f"cannot fetch {ref.url}: {e}") from e
    if n != ref.size or h.hexdigest() != ref.sha256:
        tmp.unlink(missing_ok=True)
        raise UpdateRefused(f"{ref.url}: {n} bytes, sha256 {h.hexdigest()[:12]}: does not match the signed reference")
    os.replace(tmp, dest)
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
        self._lock = threading.Lock()

    def in_progress(self) -> list[str]:
        with self._lock:
            return list(self._chunks)

    def obtain(self, ref: BundleRef, crash_point: Callable[[str], None] = lambda step: None) -> Path | None:
        """The bundle file, or None while its chunks are still arriving (``on_complete`` fires
        when the last one lands)."""
        dest = self.root / f"{ref.sha256}.edgepkg"
        if dest.exists():
            return dest
        crash_point("download")
        if ref.url:
            return fetch_url(ref, dest)
        with self._lock:
            chunks = self._chunks.get(ref.sha256)
            if chunks is None:
                chunks = self._chunks[ref.sha256] = ChunkStore(self.root, ref)
                self._subscribe(chunk_topic(ref.sha256, "+"))
        if chunks.missing():
            return None
        path = chunks.assemble(dest)
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
        if chunks is not None and chunks.put(int(parts[4]), payload) and not chunks.missing():
            self._on_complete()
