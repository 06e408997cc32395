"""The agent talks TLS to the broker when given a CA: a real mosquitto TLS listener with a
certificate made here, and the device's online status seen through it."""

from __future__ import annotations

import datetime
import ipaddress
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge_runtime.contracts.bundle import generate_keypair
from tests.broker import Broker
from tests.conftest import Daemon, edgert, free_port
from tests.fleet_models import make_bundle

pytestmark = pytest.mark.e2e


def _cert(subject: str, issuer_key: Any, issuer: x509.Name | None, ca: bool, key: Any) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )  # fmt: skip
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj: Any) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_agent_over_tls(tmp_path: Path, keys: Path) -> None:
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("edgert test CA", ca_key, None, True, ca_key)
    srv = _cert("127.0.0.1", ca_key, ca.subject, False, srv_key)
    for name, obj in (("ca.pem", ca), ("server.pem", srv), ("server.key", srv_key)):
        (tmp_path / name).write_bytes(_pem(obj))
    tls_port = free_port()
    extra = (f"listener {tls_port} 127.0.0.1\ncafile {tmp_path / 'ca.pem'}\ncertfile {tmp_path / 'server.pem'}\n"
             f"keyfile {tmp_path / 'server.key'}\n{{device_auth}}")  # fmt: skip
    broker = Broker(tmp_path / "broker", {"controller": "c", "devtls": "t"}, extra=extra)
    try:
        seen: list[dict[str, Any]] = []
        ctl = broker.client("controller")  # on the plain loopback listener
        ctl.on_message = lambda c, u, m: seen.append(json.loads(m.payload)) if m.payload else None
        ctl.subscribe("edgert/v1/devices/devtls/status", 1)
        generate_keypair(tmp_path / "fleet")
        state = tmp_path / "state"
        edgert("install", str(make_bundle(tmp_path / "b.edgepkg", keys / "signing.key", "1.0.0")), "--state-dir",
               str(state), "--trust", str(keys / "signing.pub"), check=True)  # fmt: skip
        (tmp_path / "pw").write_text("t")
        d = Daemon(state, "--broker", f"mqtts://127.0.0.1:{tls_port}", "--tls-ca", str(tmp_path / "ca.pem"),
                   "--device-id", "devtls", "--group", "g", "--fleet-key", str(tmp_path / "fleet/signing.pub"),
                   "--broker-password-file", str(tmp_path / "pw"))  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not any(s.get("online") for s in seen):
            time.sleep(0.1)
        assert any(s.get("online") for s in seen), seen
        assert d.stop() == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not seen or seen[-1].get("online")):
            time.sleep(0.1)
        assert seen[-1]["online"] is False  # a clean stop says offline before it goes
        ctl.loop_stop()
        ctl.disconnect()
    finally:
        broker.stop()
