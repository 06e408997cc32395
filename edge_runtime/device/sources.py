"""Frame sources: an OpenCV camera index, a video file, an RTSP/HTTP stream URL or an image
directory, each read at a configured rate and run through its model with the bundle's
preprocessing. When inference falls behind, the oldest waiting frames are dropped (and
counted) so results stay current instead of lagging further and further behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.device.config import SourceConfig
from edge_runtime.serving.preprocess import IMAGE_SUFFIXES, preprocess, read_image
from edge_runtime.serving.results import ResultHub, summarize
from edge_runtime.serving.runtime import Runtime

log = logging.getLogger(__name__)


def open_frames(cfg: SourceConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(frame id, BGR uint8 image) pairs; loops files when cfg.loop."""
    if cfg.kind == "images":
        files = sorted(p for p in Path(cfg.uri).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"source {cfg.name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) under {cfg.uri}")
        while True:
            for f in files:
                yield str(f.relative_to(cfg.uri)), read_image(f)
            if not cfg.loop:
                return
    import cv2

    # A camera is an index (0) or a device path (/dev/video0); OpenCV takes either.
    target: Any = int(cfg.uri) if cfg.kind == "camera" and cfg.uri.isdigit() else cfg.uri
    while True:
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            raise ValueError(f"source {cfg.name!r}: cannot open {cfg.kind} {cfg.uri!r}")
        index = 0
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    break
                yield f"{index}", frame
                index += 1
        finally:
            cap.release()
        if cfg.kind != "video" or not cfg.loop:
            return


class FrameSource:
    """A sensor frame source (camera, video, URL, image folder) feeding one model.

    Owns its capture thread and a small queue that drops the oldest frame when inference is
    behind. Never blocks the model on a slow sensor."""

    RETRY_S = 5.0  # a source that cannot be read (no camera yet, an empty folder) is tried again

    def __init__(self, cfg: SourceConfig, runtime: Runtime, hub: ResultHub) -> None:
        self.cfg, self.runtime, self.hub = cfg, runtime, hub
        self.last_error = ""  # why the source gives no frames right now ("" while it does)
        # For the status page: the last frame read (id, frame as read, wall time), capture times for
        # the measured rate, and the last result. References only: nothing is copied per frame.
        self.last_frame: tuple[str, np.ndarray, float] | None = None
        self.last_result: dict[str, Any] | None = None
        self._captured_at: deque[float] = deque(maxlen=64)
        handle = runtime.get(cfg.model)
        if handle.manifest.preprocess is None:
            raise ValueError(f"source {cfg.name!r}: model {cfg.model!r} has no image preprocessing in its manifest")
        self._pending: deque[tuple[str, np.ndarray, float]] = deque()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        m = runtime.metrics.registry
        self.captured = _metric(m, "counter", "edgert_frames_captured_total", "Frames read from sources")
        self.dropped = _metric(
            m, "counter", "edgert_frames_dropped_total", "Frames dropped because inference fell behind"
        )
        self.inferred = _metric(m, "counter", "edgert_frames_inferred_total", "Frames run through their model")
        self.errors = _metric(m, "counter", "edgert_frame_errors_total", "Frames that failed to read or infer")
        self._threads = [
            threading.Thread(target=self._capture, name=f"capture-{cfg.name}", daemon=True),
            threading.Thread(target=self._infer, name=f"infer-{cfg.name}", daemon=True),
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(5)

    def _capture(self) -> None:
        """Read frames; when the source cannot be read (or a video ends without loop), say why in
        ``last_error``, count it, and try again after RETRY_S: a device never gives up a sensor."""
        while not self._stop.is_set():
            finished = self._capture_once()
            if finished and self.cfg.kind in ("video", "images") and not self.cfg.loop:
                return  # a file or folder read once, as configured
            if not self._stop.is_set():
                self._stop.wait(self.RETRY_S)

    def _capture_once(self) -> bool:
        """True when the frames ran out normally, False when reading failed."""
        period = 1.0 / self.cfg.fps if self.cfg.fps > 0 else 0.0
        next_at = time.monotonic()
        try:
            for frame_id, frame in open_frames(self.cfg):
                if self._stop.is_set():
                    return True
                self.last_error = ""
                self.captured.inc(source=self.cfg.name)
                now = time.time()
                self.last_frame = (frame_id, frame, now)
                self._captured_at.append(time.monotonic())
                with self._cond:
                    while len(self._pending) >= self.cfg.queue:
                        self._pending.popleft()
                        self.dropped.inc(source=self.cfg.name)
                    self._pending.append((frame_id, frame, time.time()))
                    self._cond.notify()
                if period:
                    next_at += period
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    else:
                        next_at = time.monotonic()
        except Exception as e:
            self.errors.inc(source=self.cfg.name)
            if str(e) != self.last_error:
                log.error("source %s gives no frames: %s (trying again every %.0f s)", self.cfg.name, e, self.RETRY_S)
            self.last_error = str(e)
            return False
        return True

    def _infer(self) -> None:
        spec = self.runtime.get(self.cfg.model).manifest.preprocess
        assert spec is not None
        while not self._stop.is_set():
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                frame_id, frame, ts = self._pending.popleft()
            try:
                handle = self.runtime.get(self.cfg.model)
                x = preprocess(frame, spec)[None]
                t0 = time.perf_counter()
                out = self.runtime.infer(self.cfg.model, {handle.inputs[0].name: x})
                ms = (time.perf_counter() - t0) * 1000
            except Exception as e:
                self.errors.inc(source=self.cfg.name)
                log.warning("source %s frame %s failed: %s", self.cfg.name, frame_id, e)
                continue
            self.inferred.inc(source=self.cfg.name)
            self.last_result = result = {
                "source": self.cfg.name,
                "model": self.cfg.model,
                "version": handle.current.version,
                "frame": frame_id,
                "captured_at": ts,
                "latency_ms": round(ms, 3),
                "outputs": summarize(out, handle.manifest.labels),
            }
            self.hub.publish(result)

    def fps(self, window_s: float = 3.0) -> float:
        """Frames read per second over the last few seconds (0 when none came lately)."""
        now = time.monotonic()
        times = [t for t in list(self._captured_at) if now - t <= window_s]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-6)


def _metric(registry: Any, kind: str, name: str, help_: str) -> Any:
    existing = registry._metrics.get(name)
    return existing or getattr(registry, kind)(name, help_, ("source",))
