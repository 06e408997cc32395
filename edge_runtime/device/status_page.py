"""The device's own status page (``status_page: true``; off by default): what a person standing
next to the device wants to see. Models loaded and their versions, batcher figures, frame sources
with their measured rate and last error, the last frames with their predictions, and the
telemetry outbox.

Three routes on the daemon's HTTP server: ``/status`` (a static page), ``/status.js`` (its
script) and ``/status.json`` (everything the page shows, also useful to scripts), plus
``/status/frames/SOURCE.jpg`` (the source's last frame, scaled to 320 px wide). The page polls the
JSON once a second and builds its DOM with ``textContent``: values from the device (labels,
errors, file names) are never parsed as markup. No template engine and no files to ship: the
device binary carries this module and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_runtime import __version__
from edge_runtime.device.sources import FrameSource
from edge_runtime.serving.results import ResultHub
from edge_runtime.serving.runtime import Runtime

PREVIEW_WIDTH = 320


class StatusPage:
    def __init__(
        self,
        runtime: Runtime,
        hub: ResultHub,
        sources: Callable[[], list[FrameSource]],
        agent: Callable[[], Any],
        ready: Callable[[], bool],
    ) -> None:
        self.runtime, self.hub, self.sources, self.agent, self.ready = runtime, hub, sources, agent, ready
        self.started = time.time()
        self._jpeg: dict[str, tuple[str, bytes]] = {}  # source -> (frame id, jpeg): one encode per frame

    def snapshot(self) -> dict[str, Any]:
        m = self.runtime.metrics
        models = []
        for h in self.runtime.models():
            name, cur = h.name, h.current
            batches = m.batch_size.stats(model=name)
            compute = m.compute_s.stats(model=name)
            queue = m.queue_s.stats(model=name)
            stats = cur.stats.snapshot()
            models.append(
                {
                    "name": name,
                    "version": cur.version,
                    "precision": cur.manifest.precision,
                    "runtime": cur.manifest.runtime,
                    "target": cur.manifest.target,
                    "standby": h.standby.version if h.standby else None,
                    "experiment": h.experiment.kind if h.experiment else None,
                    "max_batch": h.settings.max_batch,
                    "max_delay_ms": h.settings.max_delay_ms,
                    "instances": cur.instances,
                    "requests": int(m.requests.get(model=name)),
                    "failures": int(m.failures.get(model=name)),
                    "queue_depth": int(m.queue_depth.get(model=name)),
                    "batches": int(batches[1]),
                    "mean_batch": batches[0] / batches[1] if batches[1] else None,
                    "mean_compute_ms": compute[0] / compute[1] * 1000 if compute[1] else None,
                    "mean_queue_ms": queue[0] / queue[1] * 1000 if queue[1] else None,
                    "p95_ms": stats.p95_ms,
                    "rows": stats.rows,
                    "nonfinite": stats.nonfinite,
                }
            )
        sources = []
        for s in self.sources():
            last = s.last_frame
            sources.append(
                {
                    "name": s.cfg.name,
                    "kind": s.cfg.kind,
                    "model": s.cfg.model,
                    "fps": round(s.fps(), 2),
                    "captured": int(s.captured.get(source=s.cfg.name)),
                    "inferred": int(s.inferred.get(source=s.cfg.name)),
                    "dropped": int(s.dropped.get(source=s.cfg.name)),
                    "errors": int(s.errors.get(source=s.cfg.name)),
                    "last_error": s.last_error,
                    "last_frame": {"id": last[0], "ts": last[2], "shape": list(last[1].shape)} if last else None,
                    "last_result": s.last_result,
                }
            )
        agent = self.agent()
        outbox = None
        fleet = None
        if agent is not None:
            outbox = agent.outbox.stats()
            fleet = {"connected": agent.connected.is_set(), "device": agent.cfg.device_id, "group": agent.cfg.group}
        return {
            "edgert": __version__,
            "ready": self.ready(),
            "uptime_s": round(time.time() - self.started, 1),
            "ts": time.time(),
            "models": models,
            "sources": sources,
            "recent": list(self.hub.recent)[-10:][::-1],
            "outbox": outbox,
            "fleet": fleet,
        }

    def frame_jpeg(self, name: str) -> bytes | None:
        """The source's last frame as a small JPEG (None: no such source or no frame yet)."""
        source = next((s for s in self.sources() if s.cfg.name == name), None)
        if source is None or source.last_frame is None:
            return None
        frame_id, frame, _ = source.last_frame
        cached = self._jpeg.get(name)
        if cached is not None and cached[0] == frame_id:
            return cached[1]
        import cv2

        img = np.asarray(frame)
        if img.dtype != np.uint8:
            img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[:, :, :3]
        if img.shape[1] > PREVIEW_WIDTH:
            h = max(1, round(img.shape[0] * PREVIEW_WIDTH / img.shape[1]))
            img = cv2.resize(img, (PREVIEW_WIDTH, h), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if not ok:
            return None
        data = buf.tobytes()
        self._jpeg[name] = (frame_id, data)
        return data


HTML = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgert device status</title>
<style>
body{margin:0;font:14px/1.45 system-ui,sans-serif;color:#1d2330;background:#f6f7f9}
header{padding:10px 20px;background:#1d2330;color:#fff;display:flex;gap:16px;align-items:center}
main{padding:4px 20px 30px}h2{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;background:#fff;width:100%}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #dde1e8}
th{font-size:12px;color:#6b7385}.bad{color:#c2261b}.ok{color:#1a7f37}.muted{color:#6b7385}
.frames{display:flex;flex-wrap:wrap;gap:12px}.frame{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:8px}
.frame img{display:block;max-width:320px;min-height:40px;background:#eee}
#live{font-size:12px;padding:2px 8px;border-radius:10px;background:#444}#live.on{background:#1a7f37}#live.off{background:#c2261b}
</style></head>
<body><header><strong>edgert device</strong><span id="summary"></span><span style="flex:1"></span><span id="live">connecting</span></header>
<main>
<h2>Models</h2><table id="models"><thead><tr><th>model</th><th>version</th><th>precision</th><th>standby</th>
<th>instances</th><th>max batch</th><th>requests</th><th>failures</th><th>queue</th><th>mean batch</th>
<th>compute ms</th><th>queue ms</th><th>p95 ms</th></tr></thead><tbody></tbody></table>
<h2>Frame sources</h2><table id="sources"><thead><tr><th>source</th><th>kind</th><th>model</th><th>fps</th><th>captured</th>
<th>inferred</th><th>dropped</th><th>errors</th><th>last error</th></tr></thead><tbody></tbody></table>
<h2>Last frames</h2><div id="frames" class="frames"></div>
<h2>Recent results</h2><table id="recent"><thead><tr><th>time</th><th>source</th><th>model</th><th>version</th><th>frame</th>
<th>prediction</th><th>ms</th></tr></thead><tbody></tbody></table>
<h2>Fleet and telemetry outbox</h2><p id="outbox" class="muted"></p>
</main><script src="/status.js"></script></body></html>
"""

JS = b"""// edgert device status: polls /status.json; builds the DOM with textContent only.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const fmt = (v, d) => (v === null || v === undefined) ? "-" : (typeof v === "number" ? v.toFixed(d === undefined ? 2 : d) : String(v));
  function row(tbody, cells, cls) {
    const tr = document.createElement("tr");
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    if (cls) tr.className = cls;
    tbody.appendChild(tr);
  }
  function top1(result) {
    if (!result || !result.outputs) return "-";
    for (const [name, v] of Object.entries(result.outputs)) {
      if (Array.isArray(v) && v.length) return v[0].label + " " + (v[0].score * 100).toFixed(1) + "%";
      if (v && typeof v === "object") return name + " mean " + fmt(v.mean, 3);
    }
    return "-";
  }
  window.edgertPolls = 0;
  async function poll() {
    try {
      const r = await fetch("/status.json", { cache: "no-store" });
      const s = await r.json();
      $("live").textContent = "live"; $("live").className = "on";
      $("summary").textContent = "edgert " + s.edgert + " \\u00b7 " + (s.ready ? "ready" : "not ready") + " \\u00b7 up " + Math.round(s.uptime_s) + " s";
      let tb = $("models").tBodies[0]; tb.replaceChildren();
      for (const m of s.models) row(tb, [m.name, m.version, m.precision, m.standby || "-", m.instances, m.max_batch, m.requests,
        m.failures, m.queue_depth, fmt(m.mean_batch), fmt(m.mean_compute_ms), fmt(m.mean_queue_ms), fmt(m.p95_ms)]);
      tb = $("sources").tBodies[0]; tb.replaceChildren();
      for (const x of s.sources) row(tb, [x.name, x.kind, x.model, fmt(x.fps, 1), x.captured, x.inferred, x.dropped, x.errors,
        x.last_error || "-"], x.last_error ? "bad" : "");
      const frames = $("frames");
      for (const x of s.sources) {
        let box = frames.querySelector('[data-source="' + CSS.escape(x.name) + '"]');
        if (!box) {
          box = document.createElement("div"); box.className = "frame"; box.dataset.source = x.name;
          box.appendChild(document.createElement("img")); box.appendChild(document.createElement("div"));
          frames.appendChild(box);
        }
        const img = box.querySelector("img"), cap = box.querySelector("div");
        if (x.last_frame && img.dataset.frame !== String(x.last_frame.id)) {
          img.dataset.frame = String(x.last_frame.id);
          img.src = "/status/frames/" + encodeURIComponent(x.name) + ".jpg?f=" + encodeURIComponent(x.last_frame.id);
          img.alt = x.name + " " + x.last_frame.id;
        }
        cap.textContent = x.name + ": " + (x.last_frame ? x.last_frame.id : "no frame yet") + " \\u2192 " + top1(x.last_result);
      }
      tb = $("recent").tBodies[0]; tb.replaceChildren();
      for (const x of s.recent) row(tb, [new Date(x.captured_at * 1000).toLocaleTimeString(), x.source, x.model, x.version,
        x.frame, top1(x), fmt(x.latency_ms)]);
      const o = s.outbox, f = s.fleet;
      $("outbox").textContent = f ? ("device " + f.device + " in group " + f.group + ", broker " + (f.connected ? "connected" : "not connected")
        + "; outbox " + o.depth + " records (" + (o.bytes / 1e3).toFixed(1) + " kB), " + o.dropped + " dropped")
        : "no fleet agent (no fleet section in the configuration): results stay on this device";
      window.edgertPolls += 1;
    } catch (e) {
      $("live").textContent = "unreachable"; $("live").className = "off";
    }
  }
  poll(); setInterval(poll, 1000);
})();
"""

HEADERS = (
    (b"Content-Security-Policy", b"default-src 'self'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self'"),
    (b"X-Content-Type-Options", b"nosniff"),
    (b"Cache-Control", b"no-store"),
)
