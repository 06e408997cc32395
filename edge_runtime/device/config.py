"""`edgert serve` configuration: YAML validated strictly.

An unknown key is an error that names the key and its line; every field has a description.
Command-line flags override the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edge_runtime.contracts.targets import target_names
from edge_runtime.serving.batcher import BatchSettings
from edge_runtime.serving.store import DEFAULT_STATE_DIR


class ConfigError(ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BatchingConfig(_Strict):
    max_batch: int = Field(8, ge=1, description="most rows in one batch")
    max_delay_ms: float = Field(
        0.0, ge=0, description="longest wait for a batch to fill (0: batches form while the model is busy)"
    )
    preferred: list[int] = Field(default_factory=list, description="batch sizes dispatched at once when reached")
    max_queue: int = Field(256, ge=1, description="queued requests per model; beyond it requests get 429")
    timeout_ms: float = Field(10_000, gt=0, description="a request still queued after this is dropped (504)")
    instances: int = Field(
        0,
        ge=0,
        le=64,
        description="model instances, each a batcher thread with its own session and cores/N threads"
        " (Triton's instance group); 0 = auto: 1 below 4 cores, else cores/2 up to 4",
    )

    inline_max_ms: float = Field(
        10.0,
        ge=0,
        description="a lone request (the model idle, nothing else waiting) whose run is known to take at"
        " most this long is answered without a thread hand-off back: the HTTP loop awaits it (for at most"
        " this long), the Python API runs it on the caller's thread (0: never)",
    )

    def settings(self) -> BatchSettings:
        return BatchSettings(
            self.max_batch, self.max_delay_ms, tuple(self.preferred), self.max_queue, self.timeout_ms,
            instances=self.instances, inline_max_ms=self.inline_max_ms,
        )  # fmt: skip


class CacheConfig(_Strict):
    entries: int = Field(1024, ge=1, description="results kept, least recently used evicted")
    max_age_s: float = Field(300.0, gt=0, description="a cached result older than this is recomputed")


class ModelConfig(_Strict):
    batching: BatchingConfig | None = Field(None, description="overrides the server-wide batching")
    cache: CacheConfig | None = Field(None, description="prediction cache keyed by the input's hash (off if absent)")


class SourceConfig(_Strict):
    name: str = Field(description="source name, used in results and metrics")
    model: str = Field(description="name of the installed model that runs the frames")
    kind: Literal["camera", "video", "url", "images"] = Field(description="OpenCV camera, file, stream, folder")
    uri: str = Field(
        description="camera index or device path (/dev/video0), video path, rtsp:// or http:// URL, or image folder"
    )
    fps: float = Field(10.0, ge=0, description="frames read per second (0 = as fast as the source gives)")
    loop: bool = Field(True, description="restart a video file or image folder at its end")
    queue: int = Field(2, ge=1, description="frames waiting for inference; beyond it the oldest is dropped")


def default_target() -> str:
    import platform

    return {"x86_64": "x86-cpu", "amd64": "x86-cpu", "aarch64": "arm64-cpu", "arm64": "arm64-cpu"}.get(
        platform.machine().lower(), "x86-cpu"
    )


class MqttConfig(_Strict):
    url: str = Field(description="mqtt://HOST:PORT (or mqtts:// for TLS)")
    device_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="this device's id (MQTT client id)"
    )
    group: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="fleet group")
    fleet_key: Path = Field(description="public key that signs control messages (desired state)")
    username: str | None = Field(None, description="broker user (default: the device id)")
    password_file: Path | None = Field(None, description="file holding the broker password")
    tls_ca: Path | None = Field(None, description="CA certificate to verify the broker (enables TLS)")
    tls_cert: Path | None = Field(None, description="client certificate (mutual TLS)")
    tls_key: Path | None = Field(None, description="client key (mutual TLS)")
    telemetry_interval_s: float = Field(10.0, gt=0, description="metrics snapshot period")
    outbox_max_bytes: int = Field(64 << 20, gt=0, description="disk budget of the outbox; oldest dropped (counted)")
    sample_results: float = Field(0.0, ge=0, le=1, description="share of frame results sent as telemetry")


class ServeConfig(_Strict):
    @field_validator("target")
    @classmethod
    def _known_target(cls, v: str) -> str:
        known = target_names()
        if v not in known:
            raise ValueError(f"unknown target {v!r}; expected one of: {', '.join(known)}")
        return v

    state_dir: Path = Field(DEFAULT_STATE_DIR, description="model store, keys, outbox")
    trust_dirs: list[Path] = Field(
        default_factory=list, description="more directories of trusted *.pub keys (besides STATE/keys)"
    )
    host: str = Field("127.0.0.1", description="TCP address; loopback unless you mean to expose it")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one)")
    uds: Path | None = Field(None, description="also serve on this unix domain socket")
    grpc_port: int | None = Field(
        None, ge=0, le=65535, description="also serve the v2 protocol over gRPC on this port (needs the grpc extra)"
    )
    threads: int = Field(0, ge=0, description="intra-op threads per model (0 = runtime default)")
    spin: bool = Field(
        True,
        description="ONNX Runtime threads spin-wait between ops: measured 2 ms faster per run on the orientation"
        " model; turn off when frame capture threads need the CPU",
    )
    delegate: Path | None = Field(
        None,
        description="LiteRT external delegate library for TFLite models (an NPU: libedgetpu.so.1, a vendor's"
        " NNAPI/VX delegate); missing or failing to load: XNNPACK on the CPU, with a warning",
    )
    max_body_bytes: int = Field(64 << 20, gt=0, description="largest request body accepted (413 beyond)")
    max_json_body_bytes: int = Field(
        8 << 20, gt=0, description="largest JSON request body (413 beyond); JSON costs ~4x its size to decode"
    )
    max_connections: int = Field(
        128,
        ge=1,
        description="concurrent HTTP connections (all on one event loop); beyond it the longest-idle"
        " keep-alive connection is closed, or the new client is answered 503 at once",
    )
    http_idle_timeout_s: float = Field(15.0, gt=0, description="a keep-alive connection idle this long is closed")
    http_request_timeout_s: float = Field(
        30.0, gt=0, description="a request's headers and body must arrive within this (slow clients are cut)"
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    models: dict[str, ModelConfig] = Field(default_factory=dict, description="per-model settings by name")
    sources: list[SourceConfig] = Field(default_factory=list, description="sensor frame sources")
    target: str = Field(
        default_factory=default_target,
        description="this device's target (default from the CPU architecture); bundles must match it",
    )
    mqtt: MqttConfig | None = Field(None, description="join a fleet over MQTT (absent: fully offline)")
    status_page: bool = Field(
        False,
        description="serve a live status page at /status (models, batching, sources with their last frames and"
        " predictions, outbox); off by default: it shows camera frames to whoever reaches the port",
    )


# The flags of `edgert serve`, each naming the config field it overrides. Help text and type come
# from the field itself, so the CLI cannot drift from the configuration it documents.
SERVE_FLAGS: dict[str, str] = {
    "--state-dir": "state_dir",
    "--host": "host",
    "--port": "port",
    "--uds": "uds",
    "--grpc-port": "grpc_port",
    "--threads": "threads",
    "--delegate": "delegate",
    "--max-batch": "batching.max_batch",
    "--max-delay-ms": "batching.max_delay_ms",
    "--instances": "batching.instances",
    "--target": "target",
    "--broker": "mqtt.url",
    "--device-id": "mqtt.device_id",
    "--group": "mqtt.group",
    "--fleet-key": "mqtt.fleet_key",
    "--broker-user": "mqtt.username",
    "--broker-password-file": "mqtt.password_file",
    "--tls-ca": "mqtt.tls_ca",
    "--tls-cert": "mqtt.tls_cert",
    "--tls-key": "mqtt.tls_key",
    "--telemetry-interval": "mqtt.telemetry_interval_s",
}
SECTIONS: dict[str, type[BaseModel]] = {"batching": BatchingConfig, "mqtt": MqttConfig}
FLAG_OF = {path: flag for flag, path in SERVE_FLAGS.items()}


def config_field(path: str) -> tuple[str, type]:
    """The description and the scalar type (int, float or str) of a dotted config field."""
    section, _, name = path.rpartition(".")
    model: type[BaseModel] = SECTIONS[section] if section else ServeConfig
    info = model.model_fields[name]
    annotation = info.annotation
    kind: type = str
    for candidate in (bool, int, float):
        if annotation is candidate or candidate in getattr(annotation, "__args__", ()):
            kind = candidate
            break
    return info.description or "", kind


def _line_map(node: yaml.Node, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    lines: dict[tuple[Any, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = (*path, k.value)
            lines[key] = k.start_mark.line + 1
            lines.update(_line_map(v, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[(*path, i)] = v.start_mark.line + 1
            lines.update(_line_map(v, (*path, i)))
    return lines


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> ServeConfig:
    data: dict[str, Any] = {}
    lines: dict[tuple[Any, ...], int] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
            node = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
        lines = _line_map(node) if node else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            if key.startswith(("batching.", "mqtt.")):
                section, field = key.split(".", 1)
                data.setdefault(section, {})[field] = value
            else:
                data[key] = value
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = tuple(err["loc"])
            where = ".".join(map(str, loc))
            line = lines.get(loc)
            at = f" (line {line})" if line else ""
            flag = FLAG_OF.get(where)
            # Name the flag where the value came from the command line (or is missing: either fixes it).
            from_flag = flag and ((overrides or {}).get(where) is not None or err["type"] == "missing")
            named = f"{flag} ({where})" if from_flag else where
            if err["type"] == "extra_forbidden":
                msgs.append(f"unknown key {where!r}{at}")
            elif err["type"] == "missing":
                msgs.append(f"{named}{at} is required")
            else:
                msgs.append(f"{named}{at}: {str(err['msg']).removeprefix('Value error, ')}")
        raise ConfigError(f"{path or 'config'}: " + "; ".join(msgs)) from None
