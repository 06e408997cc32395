"""The bundle format refuses every kind of bad bundle, each with a message saying what was wrong."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import pytest

from edge_runtime.contracts.bundle import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    BundleError,
    Limits,
    generate_keypair,
    load_private_key,
    load_public_keys,
    read_bundle,
    semver_key,
    write_bundle,
)

pytestmark = pytest.mark.unit

FIELDS: dict[str, Any] = {
    "name": "toy",
    "version": "1.2.3",
    "target": "x86-cpu",
    "runtime": "onnxruntime",
    "model": "model.bin",
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}],
    "precision": "fp32",
    "source_sha256": "0" * 64,
    "key_id": "",
}


@pytest.fixture()
def signed(tmp_path: Path, keys: Path) -> Path:
    out = tmp_path / "toy.edgepkg"
    write_bundle(
        out,
        FIELDS,
        {"model.bin": b"model-bytes" * 100, "report.md": b"# ok"},
        load_private_key(keys / "signing.key"),
    )
    return out


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path, "r:gz") as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]  # type: ignore[union-attr]


def _rewrite(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    out = path.with_name("evil.edgepkg")
    with tarfile.open(out, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_roundtrip(signed: Path, keys: Path) -> None:
    b = read_bundle(signed, load_public_keys([keys / "signing.pub"]))
    assert b.manifest.name == "toy" and b.model_bytes == b"model-bytes" * 100
    assert {f.path for f in b.manifest.files} == {"model.bin", "report.md"}
    assert b.signer == b.manifest.key_id


def test_private_key_mode(keys: Path) -> None:
    assert (keys / "signing.key").stat().st_mode & 0o777 == 0o600


def test_refuses_to_overwrite_key(keys: Path) -> None:
    with pytest.raises(BundleError, match="already holds a signing key.*--force"):
        generate_keypair(keys)


def test_wrong_key(signed: Path, other_keys: Path) -> None:
    with pytest.raises(BundleError, match="does not verify"):
        read_bundle(signed, load_public_keys([other_keys / "signing.pub"]))


def test_tampered_model(signed: Path, keys: Path) -> None:
    members = [(i, d + b"x" if i.name == "model.bin" else d) for i, d in _members(signed)]
    for info, data in members:
        info.size = len(data)
    with pytest.raises(BundleError, match="'model.bin' is 1101 bytes, manifest says 1100"):
        read_bundle(_rewrite(signed, members), load_public_keys([keys / "signing.pub"]))


def test_tampered_same_size(signed: Path, keys: Path) -> None:
    members = [(i, d.replace(b"model", b"MODEL") if i.name == "model.bin" else d) for i, d in _members(signed)]
    with pytest.raises(BundleError, match="sha256 mismatch"):
        read_bundle(_rewrite(signed, members), load_public_keys([keys / "signing.pub"]))


def test_tampered_manifest(signed: Path, keys: Path) -> None:
    members = [(i, d.replace(b"1.2.3", b"9.9.9") if i.name == MANIFEST_NAME else d) for i, d in _members(signed)]
    with pytest.raises(BundleError, match="does not verify"):
        read_bundle(_rewrite(signed, members), load_public_keys([keys / "signing.pub"]))


def test_unsigned(signed: Path, keys: Path) -> None:
    members = [(i, d) for i, d in _members(signed) if i.name != SIGNATURE_NAME]
    with pytest.raises(BundleError, match="unsigned"):
        read_bundle(_rewrite(signed, members), load_public_keys([keys / "signing.pub"]))


def test_truncated(signed: Path, keys: Path, tmp_path: Path) -> None:
    data = signed.read_bytes()
    for cut in (len(data) // 2, len(data) - 40, 10):
        bad = tmp_path / f"cut{cut}.edgepkg"
        bad.write_bytes(data[:cut])
        with pytest.raises(BundleError, match="truncated|damaged|not a bundle"):
            read_bundle(bad, load_public_keys([keys / "signing.pub"]))


def test_not_a_bundle(tmp_path: Path, keys: Path) -> None:
    bad = tmp_path / "x.edgepkg"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(BundleError, match="not a bundle"):
        read_bundle(bad, load_public_keys([keys / "signing.pub"]))


@pytest.mark.parametrize("name", ["../evil.onnx", "/etc/passwd", "a/../../b", "./model.bin", "a//b"])
def test_path_traversal(signed: Path, keys: Path, name: str) -> None:
    members = [*_members(signed), _file(name, b"boom")]
    with pytest.raises(BundleError, match="absolute|escapes"):
        read_bundle(_rewrite(signed, members), load_public_keys([keys / "signing.pub"]))


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_refused(signed: Path, keys: Path, kind: bytes) -> None:
    link = tarfile.TarInfo("extra.onnx")
    link.type, link.linkname = kind, "/etc/passwd"
    with pytest.raises(BundleError, match="link"):
        read_bundle(_rewrite(signed, [*_members(signed), (link, b"")]), load_public_keys([keys / "signing.pub"]))


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE])
def test_special_files_refused(signed: Path, keys: Path, kind: bytes) -> None:
    node = tarfile.TarInfo("dev")
    node.type = kind
    with pytest.raises(BundleError, match="not a regular file"):
        read_bundle(_rewrite(signed, [*_members(signed), (node, b"")]), load_public_keys([keys / "signing.pub"]))


def test_unlisted_member(signed: Path, keys: Path) -> None:
    with pytest.raises(BundleError, match="'payload.sh' is not listed"):
        read_bundle(
            _rewrite(signed, [*_members(signed), _file("payload.sh", b"#!/bin/sh")]),
            load_public_keys([keys / "signing.pub"]),
        )


def test_missing_listed_member(signed: Path, keys: Path) -> None:
    members = [(i, d) for i, d in _members(signed) if i.name != "report.md"]
    with pytest.raises(BundleError, match="lists 'report.md' but the bundle does not contain it"):
        read_bundle(_rewrite(signed, members), load_public_keys([keys / "signing.pub"]))


def test_oversized_member_refused_before_reading(signed: Path, keys: Path) -> None:
    with pytest.raises(BundleError, match="over the limit"):
        read_bundle(signed, load_public_keys([keys / "signing.pub"]), Limits(max_member_bytes=1000))


def test_decompression_bomb(tmp_path: Path, keys: Path) -> None:
    """A 64 MB member of zeros compresses to ~60 KB; the total limit stops it while streaming."""
    bomb = tmp_path / "bomb.edgepkg"
    with tarfile.open(bomb, "w:gz") as tar:
        info = tarfile.TarInfo("model.bin")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(BundleError, match="limit"):
        read_bundle(bomb, load_public_keys([keys / "signing.pub"]), Limits(max_total_bytes=16 << 20))


def test_duplicate_member(signed: Path, keys: Path) -> None:
    members = _members(signed)
    dup = next(m for m in members if m[0].name == "report.md")
    with pytest.raises(BundleError, match="appears twice"):
        read_bundle(_rewrite(signed, [*members, dup]), load_public_keys([keys / "signing.pub"]))


def test_no_trusted_keys(signed: Path) -> None:
    with pytest.raises(BundleError, match="no trusted public keys"):
        read_bundle(signed, [])


def test_write_refuses_bad_names(tmp_path: Path, keys: Path) -> None:
    with pytest.raises(BundleError, match="escapes"):
        write_bundle(
            tmp_path / "x.edgepkg",
            FIELDS,
            {"model.bin": b"m", "../x": b"y"},
            load_private_key(keys / "signing.key"),
        )
    assert not any(p.name.endswith(".edgepkg") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "field,value,msg", [("version", "1.2", "semantic"), ("name", "Bad Name", "must be 1-64 of lowercase")]
)
def test_manifest_validation(tmp_path: Path, keys: Path, field: str, value: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        write_bundle(
            tmp_path / "x.edgepkg",
            {**FIELDS, field: value},
            {"model.bin": b"m"},
            load_private_key(keys / "signing.key"),
        )


def test_semver_order() -> None:
    assert semver_key("1.0.0-rc.1") < semver_key("1.0.0") < semver_key("1.0.1") < semver_key("1.10.0")


def test_write_is_atomic_no_temp_left(tmp_path: Path, keys: Path) -> None:
    write_bundle(tmp_path / "a.edgepkg", FIELDS, {"model.bin": b"m"}, load_private_key(keys / "signing.key"))
    assert sorted(os.listdir(tmp_path)) == ["a.edgepkg"]


def test_a_bundle_for_a_cpu_feature_this_cpu_lacks_is_refused_at_install(
    tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """x86-vnni bundles hold 8-bit weights that saturate on a CPU without VNNI: installing one there
    is refused, naming the flags; with the flags (or on x86-cpu) it installs. The CPU's flags are
    the one thing faked here: this machine cannot be made to lack VNNI for real."""
    from edge_runtime.contracts import targets
    from edge_runtime.serving.store import ModelStore

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx2 fma\n")
    assert targets.cpu_flags(cpuinfo) == {"fpu", "sse2", "avx2", "fma"}
    assert targets.host_lacks("x86-vnni", {"avx2"}) == (
        "target x86-vnni needs a CPU with avx512_vnni or avx_vnni, and this CPU has none of them")  # fmt: skip
    assert targets.host_lacks("x86-vnni", {"avx2", "avx_vnni"}) is None
    assert targets.host_lacks("x86-cpu", {"avx2"}) is None
    bundle = tmp_path / "vnni.edgepkg"
    write_bundle(bundle, {**FIELDS, "target": "x86-vnni"}, {"model.bin": b"m" * 100},
                 load_private_key(keys / "signing.key"))  # fmt: skip
    store = ModelStore(tmp_path / "state")
    store.trust(keys / "signing.pub")
    monkeypatch.setattr(targets, "cpu_flags", lambda cpuinfo=None: {"avx2"})
    with pytest.raises(BundleError, match="toy 1.2.3 cannot run here: target x86-vnni needs a CPU with avx512_vnni"):
        store.install(bundle)
    assert store.active() == []
    monkeypatch.setattr(targets, "cpu_flags", lambda cpuinfo=None: {"avx2", "avx512_vnni"})
    assert store.install(bundle).manifest.target == "x86-vnni"
