"""What the operator sees of the fleet, as plain JSON-able dicts: one device (``device_json``) and one
rollout with its group's live view (``rollout_json``). The CLI's ``--json``, its tables and the
web console all read these, so the three never disagree."""

from __future__ import annotations

from typing import Any

from edge_runtime.contracts.fleet import dump
from edge_runtime.fleet.controller import Controller
from edge_runtime.fleet.db import Rollout
from edge_runtime.fleet.link import DeviceView


def device_json(v: DeviceView) -> dict[str, Any]:
    st = v.state
    models = {}
    for name, m in (st.models if st is not None else {}).items():
        rows = m.live.rows if m.live is not None else 0
        models[name] = {
            "serving": m.served,
            "active": m.version,
            "standby": m.standby,
            "pending": dump(m.pending) if m.pending else None,
            "outcome": dump(m.outcome) if m.outcome else None,
            "experiment": m.experiment.kind.value if m.experiment else None,
            "rows": rows,
            "error_rate": (m.live.errors + m.live.nonfinite) / rows if m.live is not None and rows else None,
            "p95_ms": m.live.p95_ms if m.live is not None else None,
            "drift": m.outcome.figures.drift if m.outcome is not None else None,
        }
    return {
        "id": v.id,
        "group": v.group,
        "online": v.online,
        "last_seen": v.last_seen,
        "edgert": v.edgert,
        "target": st.target if st else None,
        "models": models,
        "outbox": dump(st.outbox) if st else None,
        "control_refused": st.control_refused if st else {},
        "last_rollback": dump(st.last_rollback) if st and st.last_rollback else None,
        "refused": v.refused,
    }


def rollout_json(ctl: Controller, r: Rollout) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for d in r.devices.values():
        counts[d["status"]] = counts.get(d["status"], 0) + 1
    group = ctl.link.group(r.group)
    serving: dict[str, int] = {}
    for v in group:
        key = v.serving(r.name) or "none"
        serving[key] = serving.get(key, 0) + 1
    return {
        "rollout": {
            "id": r.id,
            "name": r.name,
            "version": r.version,
            "from_version": r.from_version,
            "group": r.group,
            "strategy": r.strategy,
            "status": r.status,
            "phase": r.phase,
            "reason": r.reason,
            "created": r.created,
            "updated": r.updated,
            "finished": r.finished,
            "params": r.params,
        },
        "counts": counts,
        "group": {
            "devices": len(group),
            "online": sum(v.online for v in group),
            "serving": serving,
            "offline_behind": sorted(v.id for v in group if not v.online and v.serving(r.name) != r.version),
        },
        "devices": r.devices,
        "experiment": ctl.experiment_figures(r) if r.strategy in ("shadow", "ab") else None,
        "decisions": ctl.db.decisions(r.id),
    }
