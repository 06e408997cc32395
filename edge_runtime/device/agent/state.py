"""A device's actual state as the fleet sees it (contracts.fleet.DeviceState), built from the
store, the runtime and the agent's records. `edgert status` builds the same from disk alone."""

from __future__ import annotations

import time

from edge_runtime.contracts.fleet import (
    DeviceState,
    ModelState,
    OutboxFigures,
    OutcomeRecord,
    PendingUpdate,
    RollbackRecord,
)
from edge_runtime.serving.runtime import Runtime
from edge_runtime.serving.store import ModelStore


def device_state(
    store: ModelStore,
    outbox: dict[str, int],
    refused: dict[str, int],
    device: str,
    group: str,
    target: str,
    seqs: dict[str, int],
    runtime: Runtime | None = None,
    outcomes: dict[str, OutcomeRecord] | None = None,
    errors: dict[str, int] | None = None,
    rebuilt: int = 0,
) -> DeviceState:
    models: dict[str, ModelState] = {}
    for m in store.active():
        pending = store.pending(m.name)
        models[m.name] = ModelState(
            version=m.version,
            staged=[v for v in store.installed_versions(m.name) if v != m.version],
            pending=PendingUpdate.model_validate(pending) if pending else None,
        )
    for h in runtime.models() if runtime is not None else []:
        ms = models.setdefault(h.name, ModelState())
        ms.serving = h.current.version
        ms.live = h.current.stats.snapshot()
        ms.standby = h.standby.version if h.standby is not None else None
        ms.experiment = h.experiment.snapshot() if h.experiment is not None else None
    for name, outcome in (outcomes or {}).items():
        models.setdefault(name, ModelState()).outcome = outcome
    last = store.last_rollback()
    return DeviceState(
        device=device, group=group, target=target, models=models,
        outbox=OutboxFigures.model_validate({k: v for k, v in outbox.items() if k in OutboxFigures.model_fields}),
        control_refused=refused, errors=errors or {}, state_files_rebuilt=rebuilt,
        last_rollback=RollbackRecord.model_validate(last) if last else None,
        desired_seq=dict(seqs), ts=time.time(),
    )  # fmt: skip
