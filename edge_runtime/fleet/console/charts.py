"""Plots as inline SVG, drawn on the server: no charting library in the browser, nothing fetched
from a CDN (consoles run on offline networks), and every label escaped here, so a version string
from a device can never become markup.

Two shapes cover what the console shows: lines over time (devices per version, error rate, p95)
and grouped bars (top-1 share and latency per version, side by side).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from html import escape

from markupsafe import Markup

# Colour-blind-safe (Okabe-Ito), then greys; a version keeps its colour on every chart.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")

Point = tuple[float, float | None]


def colour(label: str) -> str:
    return PALETTE[int(hashlib.sha256(label.encode()).hexdigest(), 16) % len(PALETTE)]


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 4, 8, 10):  # a quarter of each is a round tick
        if v <= m * mag:
            return m * mag
    return 10 * mag


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def _legend(labels: Sequence[str], x: float, y: float) -> list[str]:
    out = []
    for i, label in enumerate(labels):
        lx = x + (i % 4) * 130
        ly = y + (i // 4) * 14
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" fill="{colour(label)}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly + 1}" class="lg">{escape(label[:18])}</text>')
    return out


def _empty(parts: list[str], x: float, y: float) -> Markup:
    parts.append(f'<text x="{x}" y="{y}" class="empty" text-anchor="middle">no data yet</text>')
    return Markup("".join(parts) + "</svg>")


def _grid(parts: list[str], left: float, w: float, y: float, label: str) -> None:
    parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>')
    parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" class="ax" text-anchor="end">{escape(label)}</text>')


def line_chart(
    series: dict[str, list[Point]],
    title: str,
    unit: str = "",
    width: int = 520,
    height: int = 190,
    step: bool = False,
    y_format: Callable[[float], str] = _fmt,
    now: float | None = None,
) -> Markup:
    """Lines over wall-clock time (x: seconds before ``now``); None values break a line."""
    left, right, top, bottom = 48, 10, 22, 40 + 14 * ((len(series) - 1) // 4)
    w, h = width - left - right, height - top - bottom
    pts = [(t, v) for s in series.values() for t, v in s if v is not None]
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    parts.append(f"<title>{escape(title)}</title>")
    parts.append(f'<text x="{left}" y="14" class="tt">{escape(title)}{escape(f" ({unit})" if unit else "")}</text>')
    if not pts:
        parts.append(
            f'<text x="{left + w / 2}" y="{top + h / 2}" class="empty" text-anchor="middle">no data yet</text>'
        )
        return Markup("".join(parts) + "</svg>")
    now = now if now is not None else max(time.time(), max(t for t, _ in pts))
    t0 = min(t for t, _ in pts)
    span = max(now - t0, 10.0)
    ymax = _nice_max(max(v for _, v in pts))

    def x(t: float) -> float:
        return left + w * (t - (now - span)) / span

    def y(v: float) -> float:
        return top + h - h * v / ymax

    for i in range(5):  # horizontal grid with values
        v = ymax * i / 4
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 4}" y="{y(v) + 3:.1f}" class="ax" text-anchor="end">{escape(y_format(v))}</text>'
        )
    for i in range(4):
        ago = span * (3 - i) / 3
        parts.append(
            f'<text x="{x(now - ago):.1f}" y="{top + h + 13}" class="ax" text-anchor="middle">'
            f"{'now' if ago == 0 else f'-{ago:.0f} s'}</text>"
        )
    for label, s in series.items():
        segments: list[list[str]] = [[]]
        prev: float | None = None
        for t, val in s:
            if val is None:
                segments.append([])
                prev = None
                continue
            if step and prev is not None and segments[-1]:
                segments[-1].append(f"{x(t):.1f},{y(prev):.1f}")
            segments[-1].append(f"{x(t):.1f},{y(val):.1f}")
            prev = val
        for seg in segments:
            if len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{colour(label)}"/>')
            elif seg:
                parts.append(
                    f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour(label)}" stroke-width="2"/>'
                )
    parts += _legend(list(series), left, height - bottom + 30)
    return Markup("".join(parts) + "</svg>")


def bar_chart(
    groups: dict[str, dict[str, float]],
    title: str,
    unit: str = "",
    width: int = 520,
    height: int = 190,
    y_format: Callable[[float], str] = _fmt,
) -> Markup:
    """Grouped bars: ``groups[category][series] = value`` (e.g. top-1 class -> version -> share)."""
    labels = sorted({s for g in groups.values() for s in g})
    left, right, top, bottom = 48, 10, 22, 40 + 14 * ((len(labels) - 1) // 4 if labels else 0)
    w, h = width - left - right, height - top - bottom
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">']
    parts.append(f"<title>{escape(title)}</title>")
    parts.append(f'<text x="{left}" y="14" class="tt">{escape(title)}{escape(f" ({unit})" if unit else "")}</text>')
    values = [v for g in groups.values() for v in g.values()]
    if not values:
        parts.append(
            f'<text x="{left + w / 2}" y="{top + h / 2}" class="empty" text-anchor="middle">no data yet</text>'
        )
        return Markup("".join(parts) + "</svg>")
    ymax = _nice_max(max(values))
    for i in range(5):
        v = ymax * i / 4
        _grid(parts, left, w, top + h - h * v / ymax, y_format(v))
    cats = list(groups)
    slot = w / max(len(cats), 1)
    bw = max(min(slot * 0.8 / max(len(labels), 1), 40), 2)
    for ci, cat in enumerate(cats):
        x0 = left + ci * slot + (slot - bw * len(labels)) / 2
        for si, label in enumerate(labels):
            got = groups[cat].get(label)
            if got is None:
                continue
            bh = h * got / ymax
            parts.append(
                f'<rect x="{x0 + si * bw:.1f}" y="{top + h - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" '
                f'fill="{colour(label)}"><title>{escape(f"{cat} {label}: {y_format(got)}")}</title></rect>'
            )
        parts.append(
            f'<text x="{left + ci * slot + slot / 2:.1f}" y="{top + h + 13}" class="ax" text-anchor="middle">'
            f"{escape(cat[:14])}</text>"
        )
    parts += _legend(labels, left, height - bottom + 30)
    return Markup("".join(parts) + "</svg>")
