"""Host side of the fleet protocol: publish bundles (chunks on the broker and/or a URL) and
signed desired state. The rollout controller (`edgert fleet ...`) builds on these."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel

from edge_runtime.contracts.fleet import BundleRef, ModelSpec, chunk_topic, desired_topic
from edge_runtime.contracts.signed import desired_payload, sign

CHUNK_SIZE = 256 * 1024


def bundle_ref(path: Path, chunk_size: int = CHUNK_SIZE, url: str | None = None, chunked: bool = True) -> BundleRef:
    data = Path(path).read_bytes()
    chunks = (
        [hashlib.sha256(data[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]
        if chunked
        else []
    )
    return BundleRef(
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        chunk_size=chunk_size if chunked else 0,
        chunks=chunks,
        url=url,
    )


def publish_bundle(client: Any, path: Path, chunk_size: int = CHUNK_SIZE, timeout: float = 60.0) -> BundleRef:
    """Retained QoS 1 chunks under edgert/v1/bundles/{sha256}/{i}; returns the reference to sign."""
    data = Path(path).read_bytes()
    ref = bundle_ref(path, chunk_size)
    infos = [
        client.publish(chunk_topic(ref.sha256, i), data[off : off + chunk_size], qos=1, retain=True)
        for i, off in enumerate(range(0, len(data), chunk_size))
    ]
    for info in infos:
        info.wait_for_publish(timeout)
    return ref


def models_payload(models: dict[str, ModelSpec] | dict[str, Any]) -> dict[str, Any]:
    """Desired models as the signed payload carries them (unset fields left out). Contract models
    anywhere inside are dumped; anything else is passed as it is (tests sign malformed specs on
    purpose to show devices refuse them)."""

    def default(obj: object) -> Any:
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json", exclude_none=True)
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    out: dict[str, Any] = json.loads(json.dumps(models, default=default))
    return out


def publish_desired(
    client: Any, key: Ed25519PrivateKey, scope: str, seq: int, models: dict[str, ModelSpec] | dict[str, Any]
) -> bytes:
    message = sign(desired_payload(scope, seq, models_payload(models)), key)
    client.publish(desired_topic(scope), message, qos=1, retain=True).wait_for_publish(30)
    return message
