"""The device <-> fleet agreement, typed and in one place: what the controller signs and a device
reads (desired state), and what a device publishes and the controller reads (status, state).

Both sides build and read these models; nothing crosses the wire as a loose dict built in one
module and picked apart with ``.get`` in another. Every model refuses unknown keys
(``extra="forbid"``): a field one side does not know is an error naming that field, not a value
silently ignored. Bounds are explicit (a health window of 1e9 s or a split of 7 is refused before
anything moves). Topic names live here too.

Topics (v1):

    edgert/v1/devices/{id}/status      retained  DeviceStatus (the offline one is the last will)
    edgert/v1/devices/{id}/state       retained  DeviceState
    edgert/v1/devices/{id}/telemetry   QoS 1     outbox records: metrics snapshots, sampled results
    edgert/v1/devices/{id}/events      QoS 1     outbox records: updates, rollbacks, refusals
    edgert/v1/devices/{id}/desired     retained  signed DesiredState for this device
    edgert/v1/groups/{group}/desired   retained  signed DesiredState for the group
    edgert/v1/bundles/{sha256}/{i}     retained  chunk i of a bundle (hashes in the BundleRef)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PREFIX = "edgert/v1"
MAX_BUNDLE_BYTES = 1 << 30
MAX_STATE_BYTES = 1 << 20  # a device's retained state; the broker's own limit is set above it
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Version = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9A-Za-z.+-]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def device_topic(device: str, kind: str) -> str:
    return f"{PREFIX}/devices/{device}/{kind}"


def desired_topic(scope: str) -> str:
    """A scope is a device id or ``group:NAME``."""
    if scope.startswith("group:"):
        return f"{PREFIX}/groups/{scope[6:]}/desired"
    return device_topic(scope, "desired")


def chunk_topic(sha256: str, index: int | str) -> str:
    return f"{PREFIX}/bundles/{sha256}/{index}"


# --- desired state (controller -> device, signed) ------------------------------------------


class BundleRef(Strict):
    """Where a bundle comes from and what it must hash to: MQTT chunks and/or a URL."""

    sha256: Sha256
    size: int = Field(gt=0, le=MAX_BUNDLE_BYTES)
    chunk_size: int = Field(0, ge=0)
    chunks: list[Sha256] = Field(default_factory=list, max_length=MAX_BUNDLE_BYTES // 1024)
    url: str | None = Field(None, max_length=4096)

    @model_validator(mode="after")
    def _source(self) -> BundleRef:
        if not self.url and not (self.chunks and self.chunk_size > 0):
            raise ValueError("bundle reference names neither a URL nor MQTT chunks")
        if (
            self.chunks
            and not (len(self.chunks) - 1) * self.chunk_size < self.size <= len(self.chunks) * self.chunk_size
        ):
            raise ValueError("chunk list does not match the bundle size")
        if self.url and not self.url.startswith(("http://", "https://", "file://")):
            raise ValueError(f"bundle URL {self.url!r} must be http(s):// or file://")
        return self


class HealthPolicy(Strict):
    """How a device judges a new version during its health window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_s: float = Field(30.0, gt=0, le=24 * 3600)
    min_inferences: int = Field(20, ge=0, le=10_000_000)
    max_error_rate: float = Field(0.02, ge=0, le=1)
    max_p95_ratio: float = Field(3.0, gt=0, le=1000)
    # A p95 regression counts only above this absolute increase: sub-millisecond jitter is noise
    # on a shared CPU (a good version was once judged 4.5x slower on 14 samples of 0.1 ms).
    min_p95_increase_ms: float = Field(0.5, ge=0, le=60_000)
    max_drift: float = Field(0.3, ge=0)
    min_baseline: int = Field(20, ge=0)


class StandbySpec(Strict):
    """Blue-green: a version loaded and warmed beside the served one, serving nothing."""

    version: Version
    bundle: BundleRef | None = None


class ExperimentKind(StrEnum):
    SHADOW = "shadow"
    AB = "ab"


class ExperimentSpec(Strict):
    kind: ExperimentKind
    version: Version
    bundle: BundleRef | None = None
    split: float = Field(0.0, ge=0, le=1, description="ab: the share of requests the variant serves")


class ModelSpec(Strict):
    """One model's desired state. ``version`` None: nothing is asked of the served version."""

    version: Version | None = None
    bundle: BundleRef | None = None
    health: HealthPolicy | None = None
    standby: StandbySpec | None = None
    experiment: ExperimentSpec | None = None
    allow_downgrade: bool = False


class DesiredState(Strict):
    """The signed payload of a desired-state message."""

    type: Literal["desired"] = "desired"
    scope: str = Field(min_length=1, max_length=80)
    seq: int = Field(ge=0)
    issued: float = 0.0
    models: dict[Name, ModelSpec] = Field(default_factory=dict, max_length=256)


# --- device status and state (device -> controller, retained) ------------------------------


class UpdateOutcome(StrEnum):
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    REFUSED = "refused"
    STANDBY_REFUSED = "standby-refused"
    SHADOW_REFUSED = "experiment-shadow-refused"
    AB_REFUSED = "experiment-ab-refused"

    @property
    def failed(self) -> bool:
        return self is not UpdateOutcome.COMMITTED


class VerdictKind(StrEnum):
    """What a health window judged (``healthy`` or which check failed)."""

    HEALTHY = "healthy"
    IDLE = "idle"  # too little traffic to judge
    ERRORS = "errors"
    LATENCY = "latency"
    DRIFT = "drift"
    LOAD = "load"  # the new version failed to load or warm up
    STOPPED = "stopped"  # the daemon stopped during the window


class WindowFigures(Strict):
    """The health window's summary figures (per-version snapshots are kept off the wire)."""

    error_rate: float | None = None
    p95_ratio: float | None = None
    p95_increase_ms: float | None = None
    drift: float | None = None


class OutcomeRecord(Strict):
    """A model's last update outcome, with the desired-state seqs it answered: the controller
    tells "failed in this rollout" from an old failure by those seqs, never by device clocks."""

    version: Version
    outcome: UpdateOutcome
    reason: str = Field("", max_length=400)
    ts: float
    seqs: dict[str, int] = Field(default_factory=dict)
    figures: WindowFigures = Field(default_factory=WindowFigures)
    verdict: VerdictKind | None = None


class VersionFigures(Strict):
    """What one loaded version computed (serving.stats.VersionStats.snapshot)."""

    rows: int = 0
    errors: int = 0
    nonfinite: int = 0
    p95_ms: float | None = None
    top1: dict[str, int] = Field(default_factory=dict)
    mean: float | None = None
    mean_sum: float = 0.0
    mean_n: int = 0
    batches: int = 0
    compute_s: float = 0.0


class ShadowFigures(Strict):
    rows: int = 0
    classified: int = 0
    agree_top1: int = 0
    top1_agreement: float | None = None
    abs_diff_sum: float = 0.0
    abs_diff_n: int = 0
    mean_abs_diff: float | None = None
    max_abs_diff: float = 0.0
    dropped: int = 0
    shadow_errors: int = 0


class ExperimentReport(Strict):
    kind: ExperimentKind
    served: str
    variant: str
    variants: dict[str, VersionFigures] = Field(default_factory=dict)
    split: float | None = None
    shadow: ShadowFigures | None = None


class PendingUpdate(Strict):
    """The store's update journal: an activation not yet committed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_version: str | None = Field(None, alias="from")
    to_version: str = Field(alias="to")


class RollbackRecord(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str
    from_version: str = Field(alias="from")
    to_version: str | None = Field(None, alias="to")
    reason: str = ""
    ts: float = 0.0


class ModelState(Strict):
    version: str | None = None  # the store's active pointer
    staged: list[str] = Field(default_factory=list)
    pending: PendingUpdate | None = None
    serving: str | None = None  # what the runtime serves now (differs from version mid-update)
    live: VersionFigures | None = None
    standby: str | None = None
    experiment: ExperimentReport | None = None
    outcome: OutcomeRecord | None = None

    @property
    def served(self) -> str | None:
        return self.serving if self.serving is not None else self.version


class OutboxFigures(Strict):
    depth: int = 0
    bytes: int = 0
    disk_bytes: int = 0
    dropped: int = 0


class DeviceState(Strict):
    device: str
    group: str = ""
    target: str = ""
    models: dict[str, ModelState] = Field(default_factory=dict)
    outbox: OutboxFigures = Field(default_factory=OutboxFigures)
    control_refused: dict[str, int] = Field(default_factory=dict)
    errors: dict[str, int] = Field(default_factory=dict, description="failures inside the agent, by where")
    state_files_rebuilt: int = 0
    last_rollback: RollbackRecord | None = None
    desired_seq: dict[str, int] = Field(default_factory=dict)
    ts: float = 0.0

    def model(self, name: str) -> ModelState:
        return self.models.get(name) or ModelState()


class DeviceStatus(Strict):
    device: str
    group: str = ""
    online: bool
    ts: float = 0.0
    edgert: str = ""


def wire(model: BaseModel) -> bytes:
    """A contract model as the JSON bytes that go on the wire (aliases, no Python-only values)."""
    return model.model_dump_json(by_alias=True).encode()


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True)
