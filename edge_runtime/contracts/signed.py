"""Signed control messages between the fleet controller and devices.

Envelope (JSON): ``{"payload": {...}, "key_id": "...", "sig": "<base64 Ed25519 over the
canonical payload bytes>"}``. The payload names its ``type`` ("desired", "cmd"), its ``scope``
(the device id or ``group:NAME`` it is for) and a ``seq`` that only grows per scope. A device
refuses, and counts, anything unsigned, signed by another key, for another scope, not newer than
what it already accepted (replayed or stale retained), malformed or oversized.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.contracts.bundle import key_id
from edge_runtime.contracts.wire import WireError, parse_json

MAX_CONTROL_BYTES = 256 * 1024


class ControlRefused(Exception):
    """Refused control message; ``reason`` is a short label for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()


def sign(payload: Mapping[str, Any], key: Ed25519PrivateKey) -> bytes:
    sig = key.sign(canonical(payload))
    return json.dumps(
        {"payload": payload, "key_id": key_id(key.public_key()), "sig": base64.b64encode(sig).decode()}
    ).encode()


def open_envelope(raw: bytes, keys: list[Ed25519PublicKey], scope: str, kind: str) -> dict[str, Any]:
    """Verify and return the payload, or raise ControlRefused (the sequence is checked by SeqGuard)."""
    try:
        env = parse_json(raw, MAX_CONTROL_BYTES)
    except WireError as e:
        raise ControlRefused("oversized" if e.reason == "oversized" else "malformed", str(e)) from e
    if not isinstance(env, dict) or not isinstance(env.get("payload"), dict):
        raise ControlRefused("malformed", "expected an envelope with a 'payload' object")
    if "sig" not in env:
        raise ControlRefused("unsigned", "no signature")
    try:
        sig = base64.b64decode(env["sig"], validate=True)
    except (ValueError, TypeError) as e:
        raise ControlRefused("malformed", f"signature is not base64: {e}") from e
    payload = env["payload"]
    data = canonical(payload)
    for k in keys:
        try:
            k.verify(sig, data)
            break
        except InvalidSignature:
            continue
    else:
        raise ControlRefused("forged", "signature does not verify against the fleet key")
    if payload.get("type") != kind:
        raise ControlRefused("wrong-type", f"expected {kind!r}, got {payload.get('type')!r}")
    if payload.get("scope") != scope:
        raise ControlRefused("wrong-scope", f"message is for {payload.get('scope')!r}, this topic is {scope!r}")
    if not isinstance(payload.get("seq"), int) or payload["seq"] < 0:
        raise ControlRefused("malformed", "payload needs a non-negative integer 'seq'")
    return payload


def desired_payload(scope: str, seq: int, models: dict[str, Any]) -> dict[str, Any]:
    return {"type": "desired", "scope": scope, "seq": seq, "issued": time.time(), "models": models}
