"""Prediction cache per model: results keyed by a hash of the model version and the exact
input bytes, bounded in entries (LRU) and in age. Off by default; useful for repeated queries,
pointless for sensor streams where no two frames are equal."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict

import numpy as np


class PredictionCache:
    def __init__(self, entries: int, max_age_s: float) -> None:
        self.entries, self.max_age_s = entries, max_age_s
        self._data: OrderedDict[str, tuple[float, dict[str, np.ndarray]]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(version: str, feeds: dict[str, np.ndarray]) -> str:
        h = hashlib.sha256(version.encode())
        for name in sorted(feeds):
            a = np.ascontiguousarray(feeds[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.data)
        return h.hexdigest()

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if time.monotonic() - item[0] > self.max_age_s:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return item[1]

    def put(self, key: str, outputs: dict[str, np.ndarray]) -> None:
        frozen = {}
        for k, v in outputs.items():
            v = v.copy()
            v.flags.writeable = False  # shared between callers: nobody may change it
            frozen[k] = v
        with self._lock:
            self._data[key] = (time.monotonic(), frozen)
            self._data.move_to_end(key)
            while len(self._data) > self.entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
