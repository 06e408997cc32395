"""A small thread-safe metrics registry that renders the Prometheus text format (0.0.4).

No dependency: a device binary should not pull a client library for a few counters.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Sequence

LabelKey = tuple[str, ...]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _fmt_labels(names: Sequence[str], values: LabelKey, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help_, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelKey:
        return tuple(str(labels[n]) for n in self.labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_, labels)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = list(self._values.items())
        return [f"{self.name}{_fmt_labels(self.labels, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = value

    def remove(self, **labels: str) -> None:
        with self._lock:
            self._values.pop(self._key(labels), None)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()) -> None:
        super().__init__(name, help_, labels)
        self.buckets = tuple(buckets) or LATENCY_BUCKETS
        self._data: dict[LabelKey, tuple[list[int], list[float]]] = {}  # counts per bucket, [sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts, agg = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0, 0.0]))
            counts[i] += 1
            agg[0] += value
            agg[1] += 1

    def stats(self, **labels: str) -> tuple[float, float]:
        """(sum, count) of the observations with these labels."""
        with self._lock:
            entry = self._data.get(self._key(labels))
            return (entry[1][0], entry[1][1]) if entry else (0.0, 0.0)

    def render(self) -> list[str]:
        out = []
        with self._lock:
            items = [(k, list(c), list(a)) for k, (c, a) in self._data.items()]
        for key, counts, (total, count) in items:
            running = 0
            for bound, c in zip((*self.buckets, float("inf")), counts, strict=True):
                running += c
                le = "+Inf" if bound == float("inf") else _num(bound)
                le_label = 'le="' + le + '"'
                out.append(f"{self.name}_bucket{_fmt_labels(self.labels, key, le_label)} {running}")
            out.append(f"{self.name}_sum{_fmt_labels(self.labels, key)} {_num(total)}")
            out.append(f"{self.name}_count{_fmt_labels(self.labels, key)} {_num(count)}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help_: str, labels: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help_, labels))  # type: ignore[return-value]

    def gauge(self, name: str, help_: str, labels: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help_, labels))  # type: ignore[return-value]

    def histogram(self, name: str, help_: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()) -> Histogram:
        return self._add(Histogram(name, help_, labels, buckets))  # type: ignore[return-value]

    def on_collect(self, fn: Callable[[], None]) -> None:
        """Run fn before each render (to refresh gauges such as memory)."""
        self._collectors.append(fn)

    def render(self) -> str:
        for fn in self._collectors:
            fn()
        lines: list[str] = []
        for m in self._metrics.values():
            body = m.render()
            if body:
                lines += m.header() + body
        return "\n".join(lines) + "\n"


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc), 0 where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
