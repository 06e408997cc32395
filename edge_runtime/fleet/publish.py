"""Host side of the fleet protocol: publish bundles (chunks on the broker and/or a URL) and
signed desired state. The rollout controller (`edgert fleet ...`) builds on these."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime.contracts.signed import desired_payload, sign

PREFIX = "edgert/v1"
CHUNK_SIZE = 256 * 1024


def bundle_ref(
    path: Path, chunk_size: int = CHUNK_SIZE, url: str | None = None, chunked: bool = True
) -> dict[str, Any]:
    data = Path(path).read_bytes()
    ref: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    if chunked:
        ref["chunk_size"] = chunk_size
        ref["chunks"] = [hashlib.sha256(data[i : i + chunk_size]).hexdigest() for i in range(0, len(data), chunk_size)]
    if url:
        ref["url"] = url
    return ref


def publish_bundle(client: Any, path: Path, chunk_size: int = CHUNK_SIZE, timeout: float = 60.0) -> dict[str, Any]:
    """Retained QoS 1 chunks under edgert/v1/bundles/{sha256}/{i}; returns the reference to sign."""
    data = Path(path).read_bytes()
    ref = bundle_ref(path, chunk_size)
    infos = [
        client.publish(f"{PREFIX}/bundles/{ref['sha256']}/{i}", data[off : off + chunk_size], qos=1, retain=True)
        for i, off in enumerate(range(0, len(data), chunk_size))
    ]
    for info in infos:
        info.wait_for_publish(timeout)
    return ref


def desired_topic(scope: str) -> str:
    if scope.startswith("group:"):
        return f"{PREFIX}/groups/{scope[6:]}/desired"
    return f"{PREFIX}/devices/{scope}/desired"


def publish_desired(client: Any, key: Ed25519PrivateKey, scope: str, seq: int, models: dict[str, Any]) -> bytes:
    message = sign(desired_payload(scope, seq, models), key)
    client.publish(desired_topic(scope), message, qos=1, retain=True).wait_for_publish(30)
    return message
