"""The console's pages: for each URL, the data it shows and the live sections it is made of.

A page is a list of sections (id, template, context). The first load renders them inside the
layout; the live stream (``/events``) renders the same sections again whenever the fleet changes
and sends those that differ, so the browser swaps them in without a reload. Templates are Jinja2
with autoescaping on: a device id, group or version is text wherever it appears.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from edge_runtime.fleet.console.charts import bar_chart, colour, line_chart
from edge_runtime.fleet.console.history import AFTER_END_S, History
from edge_runtime.fleet.controller import Controller, FleetError
from edge_runtime.fleet.strategies import EXPERIMENTS
from edge_runtime.fleet.views import device_json, rollout_json

TEMPLATES = Path(__file__).parent / "templates"


class NotFound(Exception):
    pass


@dataclass
class Page:
    title: str
    sections: list[tuple[str, str, dict[str, Any]]]
    nav: str


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    s = max(time.time() - ts, 0)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    return f"{s / 3600:.1f} h ago"


def _clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def _pct(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x * 100:.{digits}f}%"


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=_ago, clock=_clock, pct=_pct, num=_num, colour=colour, q=lambda s: quote(str(s), safe=""))
    return env


class Pages:
    """Builds every page from the controller's live view (FleetLink), its state file and the
    console's history. Never changes anything: actions go through ``actions.Actions``."""

    def __init__(self, ctl: Controller, history: History, can_act: Callable[[], bool]) -> None:
        self.ctl, self.link, self.db, self.history = ctl, ctl.link, ctl.db, history
        self.can_act = can_act
        self.env = environment()
        self.driving: Callable[[int], bool] = lambda rid: False

    # --- routing -----------------------------------------------------------------------

    def page(self, path: str, query: dict[str, str]) -> Page:
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts:
            return self.fleet(query)
        if parts == ["rollouts"]:
            return self.rollouts()
        if len(parts) == 2 and parts[0] == "rollouts" and parts[1].isdigit():
            return self.rollout(int(parts[1]))
        if len(parts) == 2 and parts[0] == "devices":
            return self.device(parts[1])
        raise NotFound(path)

    def render_page(self, path: str, query: dict[str, str], ctx: dict[str, Any]) -> str:
        page = self.page(path, query)
        sections = [(sid, Markup(self.env.get_template(t).render(**c, **ctx))) for sid, t, c in page.sections]
        return self.env.get_template("layout.html").render(
            title=page.title, nav=page.nav, sections=sections, query=query, **ctx
        )

    def render_sections(self, path: str, query: dict[str, str], ctx: dict[str, Any]) -> dict[str, str]:
        page = self.page(path, query)
        return {sid: self.env.get_template(t).render(**c, **ctx) for sid, t, c in page.sections}

    # --- the fleet -----------------------------------------------------------------------

    def fleet(self, query: dict[str, str]) -> Page:
        views = self.link.group(None)
        group, model, version = query.get("group") or "", query.get("model") or "", query.get("version") or ""
        rows = []
        groups: dict[str, int] = {}
        models: set[str] = set()
        versions: set[str] = set()
        by_version: dict[str, dict[str, int]] = {}
        for v in views:
            d = device_json(v)
            groups[d["group"]] = groups.get(d["group"], 0) + 1
            for name, m in d["models"].items():
                models.add(name)
                for ver in (m["serving"], m["active"], m["standby"]):
                    if ver:
                        versions.add(ver)
                key = m["serving"] or "none"
                by_version.setdefault(name, {})[key] = by_version.setdefault(name, {}).get(key, 0) + 1
            if group and d["group"] != group:
                continue
            if model and model not in d["models"]:
                continue
            if version:
                ms = [d["models"][model]] if model else list(d["models"].values())
                if not any(version in (m["serving"], m["active"], m["standby"]) for m in ms):
                    continue
            rows.append(d)
        active = [rollout_json(self.ctl, r) for r in self.db.rollouts(active_only=True)]
        summary = {
            "devices": len(views),
            "online": sum(v.online for v in views),
            "groups": dict(sorted(groups.items())),
            "by_version": {n: dict(sorted(c.items())) for n, c in sorted(by_version.items())},
            "active": active,
        }
        filters = {
            "groups": sorted(groups),
            "models": sorted(models),
            "versions": sorted(versions),
            "group": group,
            "model": model,
            "version": version,
        }
        return Page(
            "Fleet",
            [
                ("summary", "fleet_summary.html", {"s": summary}),
                ("devices", "fleet_devices.html", {"rows": rows, "f": filters, "total": len(views)}),
            ],
            "fleet",
        )

    # --- rollouts ----------------------------------------------------------------------

    def rollouts(self) -> Page:
        items = [rollout_json(self.ctl, r) for r in reversed(self.db.rollouts(last=100))]
        return Page("Rollouts", [("rollouts", "rollouts.html", {"items": items})], "rollouts")

    def rollout(self, rid: int) -> Page:
        try:
            r = self.ctl.resolve(rid, active=False)
        except FleetError:
            raise NotFound(f"/rollouts/{rid}") from None
        j = rollout_json(self.ctl, r)
        group = self.link.group(r.group)
        moved = set(r.devices)
        counts = {
            "passed": sum(d["status"] == "passed" for d in r.devices.values()),
            "failed": sum(d["status"] == "failed" for d in r.devices.values()),
            ("waiting" if r.active else "no verdict"): sum(d["status"] == "moved" for d in r.devices.values()),
            "not moved": sum(v.online and v.id not in moved for v in group),
            "offline": sum(not v.online for v in group),
        }
        samples = self.db.samples(r.id)
        devices_s: dict[str, list[tuple[float, float | None]]] = {}
        errors_s: dict[str, list[tuple[float, float | None]]] = {}
        p95_s: dict[str, list[tuple[float, float | None]]] = {}
        for s in samples:
            devices_s.setdefault(s["version"], []).append((s["ts"], float(s["devices"])))
            if s["version"] != "none":
                er = s["error_rate"]
                errors_s.setdefault(s["version"], []).append((s["ts"], None if er is None else er * 100))
                p95_s.setdefault(s["version"], []).append((s["ts"], s["p95_ms"]))
        end = min(time.time(), r.finished + AFTER_END_S) if r.finished else None
        plots = [
            line_chart(devices_s, "devices on each version", step=True, now=end),
            line_chart(errors_s, "error rate per version", "% of rows", now=end),
            line_chart(p95_s, "p95 latency per version", "ms", now=end),
        ]
        actions = []
        if self.can_act():
            if r.active:
                actions.append(("abort", "Abort", f"Abort rollout {r.id} and put every moved device back on "
                                f"{r.from_version or 'no version'}?"))  # fmt: skip
            if r.strategy in EXPERIMENTS and r.status == "observing":
                actions.append(("promote", "Promote", f"Promote {r.version} to every device of group {r.group}?"))
            if r.active and r.status != "observing" and not self.driving(r.id):
                actions.append(("resume", "Resume", f"Drive rollout {r.id} from this console? (If another "
                                "controller process still drives it, stop that one first.)"))  # fmt: skip
            if r.status == "completed" and r.from_version:
                actions.append(("rollback", "Roll back", f"Put group {r.group} back on {r.from_version}?"))
        head = {"j": j, "counts": counts, "actions": actions, "driving": self.driving(r.id)}
        sections: list[tuple[str, str, dict[str, Any]]] = [
            ("head", "rollout_head.html", head),
            ("plots", "plots.html", {"plots": plots}),
        ]
        exp = j["experiment"]
        if exp is not None:
            sections.append(("experiment", "experiment.html", {"exp": exp, "plots": self._experiment_plots(exp)}))
        sections += [
            ("decisions", "decisions.html", {"decisions": list(reversed(j["decisions"]))[:200]}),
            ("parts", "rollout_parts.html", {"parts": sorted(r.devices.items()), "j": j}),
        ]
        return Page(f"Rollout {r.id}", sections, "rollouts")

    @staticmethod
    def _experiment_plots(exp: dict[str, Any]) -> list[Markup]:
        variants = exp["variants"]
        top1: dict[str, dict[str, float]] = {}
        for ver, a in sorted(variants.items()):
            for cls, share in a["top1_share"].items():
                top1.setdefault(str(cls), {})[ver] = share * 100
        latency: dict[str, dict[str, float]] = {"mean compute": {}, "p95 (median of devices)": {}}
        errors: dict[str, dict[str, float]] = {"error rate": {}}
        for ver, a in sorted(variants.items()):
            if a["mean_compute_ms"] is not None:
                latency["mean compute"][ver] = a["mean_compute_ms"]
            if a["p95_ms_median_of_devices"] is not None:
                latency["p95 (median of devices)"][ver] = a["p95_ms_median_of_devices"]
            if a["error_rate"] is not None:
                errors["error rate"][ver] = a["error_rate"] * 100
        return [
            bar_chart(top1, "top-1 class share per version", "%"),
            bar_chart(latency, "latency per version", "ms"),
            bar_chart(errors, "error rate per version", "% of rows"),
        ]

    # --- one device ----------------------------------------------------------------------

    def device(self, device: str) -> Page:
        v = self.link.view(device)
        if v is None:
            raise NotFound(f"/devices/{device}")
        d = device_json(v)
        st = v.state
        detail = {}
        for name, m in (st.models if st is not None else {}).items():
            detail[name] = {"staged": m.staged, "outcome": m.outcome, "pending": m.pending}
        h = self.history.device(device)
        err: dict[str, list[tuple[float, float | None]]] = {}
        p95: dict[str, list[tuple[float, float | None]]] = {}
        outbox: dict[str, list[tuple[float, float | None]]] = {"outbox depth": []}
        snapshots = list(h.snapshots) if h else []
        labels = sorted({f"{n} {m['serving']}" for s in snapshots for n, m in s["models"].items()})
        for label in labels:  # one line per model version, broken where that version was not served
            err[label], p95[label] = [], []
        for snap in snapshots:
            seen = {f"{n} {f['serving']}": f for n, f in snap["models"].items()}
            for label in labels:
                fig = seen.get(label)
                er = fig["error_rate"] if fig else None
                err[label].append((snap["ts"], None if er is None else er * 100))
                p95[label].append((snap["ts"], fig["p95_ms"] if fig else None))
            outbox["outbox depth"].append((snap["ts"], snap["outbox"]))
        plots = [
            line_chart(err, "error rate", "% of rows"),
            line_chart(p95, "p95 latency", "ms"),
            line_chart(outbox, "telemetry outbox", "records", step=True),
        ]
        sections: list[tuple[str, str, dict[str, Any]]] = [
            ("head", "device_head.html", {"d": d, "errors": st.errors if st else {}}),
            ("models", "device_models.html", {"d": d, "detail": detail}),
            ("plots", "plots.html", {"plots": plots}),
            (
                "events",
                "device_events.html",
                {"events": list(reversed(h.events)) if h else [], "parts": self.db.device_parts(device)},
            ),
        ]
        return Page(f"Device {device}", sections, "fleet")
