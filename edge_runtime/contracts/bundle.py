"""The bundle format: manifest schema, hashing, Ed25519 signing and safe reading.

A bundle (``NAME-VERSION-TARGET.edgepkg``) is a gzip'd tar holding ``manifest.json``,
``manifest.sig`` (64 raw Ed25519 signature bytes over the exact manifest bytes) and the
files the manifest lists, each with its sha256 and size.

Reading trusts nothing until the signature checks out: member names, types and sizes are
checked while streaming, nothing is written to disk, nothing is unpickled, and a file that
the signed manifest does not list is refused. This module imports nothing else of the
project: host and device both rely on it to say what a bundle is.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class BundleError(Exception):
    """A bundle was refused; the message says what was wrong."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds applied while reading, before any byte is trusted (decompression bombs)."""

    max_member_bytes: int = 1 << 30
    max_total_bytes: int = 2 << 30
    max_members: int = 64
    max_manifest_bytes: int = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class TensorSpec(_Strict):
    """A model input or output. A dimension is an int, or a string naming a free dimension."""

    name: str
    dtype: str = Field(description="numpy dtype name, e.g. float32, int64, uint8")
    shape: list[int | str]


class PreprocessSpec(_Strict):
    """How a raw image (BGR uint8, as OpenCV reads it) becomes the model input. The packager
    calibrates and validates with exactly this, and the daemon applies it to sensor frames."""

    size: tuple[int, int] = Field(description="target width, height")
    resize: Literal["stretch", "letterbox", "pad", "center_crop"] = "stretch"
    resize_short: int | None = Field(None, description="center_crop: short side before the crop")
    interpolation: Literal["linear", "area", "cubic", "lanczos", "nearest"] = "linear"
    layout: Literal["nchw", "nhwc"] = "nchw"
    color: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pad_value: float = 0.0
    dtype: Literal["float32", "float16", "uint8", "int8"] = "float32"

    @field_validator("size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] <= 0 or v[1] <= 0:
            raise ValueError(f"size must be positive WxH, got {v[0]}x{v[1]}")
        return v

    @field_validator("std")
    @classmethod
    def _nonzero(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s == 0 for s in v):
            raise ValueError(f"std must not contain 0, got {list(v)}")
        return v


class BatchProfile(_Strict):
    """An explicit batch profile (TensorRT's min/opt/max shapes along axis 0)."""

    min: int = Field(ge=1)
    opt: int = Field(ge=1)
    max: int = Field(ge=1)


class BatchingSpec(_Strict):
    """Whether requests to this model may be stacked along axis 0, and how far."""

    max_batch: int = Field(0, ge=0, description="largest batch the model takes (0: no limit of its own)")
    batchable: bool = Field(True, description="axis 0 is a free batch axis")
    stateful: bool = Field(False, description="declared stateful: never batched")
    reason: str = Field("", description="why (not) batchable, for people")
    profile: BatchProfile | None = None
    warmup: str | None = Field(None, description="bundle file holding a real warm-up sample (.npz)")


class RuntimeOptions(_Strict):
    """Backend settings the device applies to this model."""

    providers: list[str] = Field(default_factory=list, description="ONNX Runtime execution providers, in order")
    provider_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    artifact: str | None = Field(None, description="tflite for LiteRT bundles")
    delegate_hint: str | None = Field(None, description="the NPU delegate library the target expects")
    choice: str | None = Field(None, description="what the packer chose, for people")


class BundleManifest(_Strict):
    schema_version: Literal[1] = 1
    name: str
    version: str
    target: str
    runtime: Literal["onnxruntime", "litert"]
    created: str = Field(description="UTC, ISO 8601")
    model: str = Field(description="path of the model file inside the bundle")
    files: list[FileEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocess: PreprocessSpec | None = None
    labels: list[str] | None = None
    precision: Literal["int8", "fp16", "fp32"]
    quantization: dict[str, Any] = Field(default_factory=dict)
    validation: dict[str, Any] = Field(default_factory=dict)
    runtime_options: RuntimeOptions = Field(default_factory=RuntimeOptions)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    source_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    key_id: str = Field(description="sha256 of the raw signing public key, first 16 hex digits")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("version")
    @classmethod
    def _semver(cls, v: str) -> str:
        return check_version(v)

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}-{self.target}.edgepkg"


def check_name(v: str) -> str:
    """A model name as a bundle records it (and a file name and an MQTT topic level can hold)."""
    if not NAME.fullmatch(v):
        raise ValueError(f"name {v!r} must be 1-64 of lowercase letters, digits, '.', '_', '-' (e.g. orientation)")
    return v


def check_version(v: str) -> str:
    if not SEMVER.fullmatch(v):
        raise ValueError(f"version {v!r} is not semantic versioning: expected MAJOR.MINOR.PATCH, e.g. 1.0.0")
    return v


def semver_key(version: str) -> tuple[int, int, int, int, tuple[tuple[int, int | str], ...]]:
    """Sort key for semantic versions (semver.org section 11): a pre-release sorts before its
    release; pre-release identifiers compare one by one, numbers numerically and below words
    (1.0.0-alpha < 1.0.0-alpha.1 < 1.0.0-beta < 1.0.0-beta.2 < 1.0.0-beta.11 < 1.0.0-rc.1 < 1.0.0)."""
    m = SEMVER.fullmatch(version)
    if not m:
        raise ValueError(f"version {version!r} is not semantic versioning")
    pre = m.group(4)
    ids: tuple[tuple[int, int | str], ...] = tuple(
        (0, int(part)) if part.isdigit() else (1, part) for part in (pre.split(".") if pre else [])
    )
    return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 0 if pre else 1, ids)


# --- keys --------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out_dir: Path, force: bool = False) -> tuple[Path, Path]:
    """Write ``signing.key`` (PKCS#8 PEM, mode 0600) and ``signing.pub`` into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out_dir / "signing.key", out_dir / "signing.pub"
    if priv_path.exists() and not force:
        raise BundleError(
            f"{out_dir} already holds a signing key ({priv_path}); pass --force to replace it (bundles signed "
            "with the old key will not verify against the new public key)"
        )
    if force:
        priv_path.unlink(missing_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return priv_path, pub_path


def _read_key_file(path: Path, kind: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        what = "signing" if kind == "private" else kind
        raise BundleError(f"cannot read {what} key {path}: {e.strerror or e}") from e
    if kind == "private" and b"PUBLIC KEY-----" in data:
        raise BundleError(f"{path} is a public key; this option wants the private signing key (signing.key)")
    if kind == "public" and b"PRIVATE KEY-----" in data:
        raise BundleError(f"{path} is a private key; this option wants a public key (signing.pub), never the secret")
    return data


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_file(path, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(f"cannot read signing key {path}: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    data = _read_key_file(path, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise BundleError(f"cannot read public key {path}: {e}") from e
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{path} is not an Ed25519 public key")
    return key


def load_public_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    """Keys from files, or from every ``*.pub`` in a directory."""
    keys: list[Ed25519PublicKey] = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.pub")) if p.is_dir() else [p]
        keys.extend(load_public_key(f) for f in files)
    return keys


# --- writing -----------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_member_name(name: str) -> str:
    if not name or "\\" in name or "\x00" in name:
        raise BundleError(f"member name {name!r} is empty or holds a backslash or NUL")
    p = PurePosixPath(name)
    if p.is_absolute():
        raise BundleError(f"member {name!r} has an absolute path; bundle paths must be relative")
    if any(part in ("..", ".", "") for part in name.split("/")):
        raise BundleError(f"member {name!r} escapes the bundle or is not normalized ('..', '.', '//')")
    return name


def write_bundle(
    out_path: Path,
    manifest_fields: Mapping[str, Any],
    files: Mapping[str, bytes],
    private_key: Ed25519PrivateKey,
) -> BundleManifest:
    """Hash the files, complete and sign the manifest, and write the bundle atomically."""
    entries = [FileEntry(path=_check_member_name(n), sha256=sha256_bytes(b), size=len(b)) for n, b in files.items()]
    fields = dict(manifest_fields)
    fields.update(
        files=entries,
        key_id=key_id(private_key.public_key()),
        created=fields.get("created") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    manifest = BundleManifest.model_validate(fields)
    if manifest.model not in files:
        raise BundleError(f"manifest names model {manifest.model!r} but no such file was given")
    manifest_bytes = manifest_to_bytes(manifest)
    signature = private_key.sign(manifest_bytes)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                for name, data in [
                    (MANIFEST_NAME, manifest_bytes),
                    (SIGNATURE_NAME, signature),
                    *files.items(),
                ]:
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def manifest_to_bytes(manifest: BundleManifest) -> bytes:
    return json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True).encode()


# --- reading -----------------------------------------------------------------------------


@dataclass
class Bundle:
    """A verified bundle held in memory: its manifest and the bytes of every listed file."""

    manifest: BundleManifest
    files: dict[str, bytes] = field(repr=False)
    path: Path | None = None
    signer: str | None = None

    @property
    def model_bytes(self) -> bytes:
        return self.files[self.manifest.model]

    @property
    def sha256(self) -> str:
        """Identity of the whole bundle: the hash of its signed manifest."""
        return sha256_bytes(manifest_to_bytes(self.manifest))


def _read_members(source: Path | bytes, limits: Limits) -> dict[str, bytes]:
    members: dict[str, bytes] = {}
    total = 0
    try:
        fileobj = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
    except OSError as e:
        raise BundleError(f"cannot open bundle: {e}") from e
    with fileobj:
        try:
            tar = tarfile.open(fileobj=fileobj, mode="r:gz")  # noqa: SIM115 - closed by the with below
        except (tarfile.TarError, OSError, EOFError) as e:
            raise BundleError(f"not a bundle (expected a gzip'd tar): {e}") from e
        with tar:
            try:
                for info in tar:
                    name = _check_member_name(info.name)
                    if info.issym() or info.islnk():
                        raise BundleError(f"member {name!r} is a link to {info.linkname!r}; links are refused")
                    if not info.isreg():
                        raise BundleError(f"member {name!r} is not a regular file (device, fifo or directory)")
                    if name in members:
                        raise BundleError(f"member {name!r} appears twice")
                    if len(members) >= limits.max_members:
                        raise BundleError(f"bundle has more than {limits.max_members} members")
                    cap = limits.max_manifest_bytes if name == MANIFEST_NAME else limits.max_member_bytes
                    if info.size > cap:
                        raise BundleError(f"member {name!r} is {info.size} bytes, over the limit of {cap}")
                    total += info.size
                    if total > limits.max_total_bytes:
                        raise BundleError(f"bundle expands past the limit of {limits.max_total_bytes} bytes")
                    f = tar.extractfile(info)
                    if f is None:
                        raise BundleError(f"member {name!r} cannot be read")
                    data = f.read(info.size + 1)
                    if len(data) != info.size:
                        raise BundleError(f"member {name!r} is truncated ({len(data)} of {info.size} bytes)")
                    members[name] = data
            except (tarfile.TarError, OSError, EOFError, ValueError) as e:
                raise BundleError(f"bundle is damaged or truncated: {e}") from e
    return members


def read_bundle(
    source: Path | bytes,
    trusted_keys: Iterable[Ed25519PublicKey],
    limits: Limits | None = None,
    check_external_data: bool = True,
) -> Bundle:
    """Read and verify a bundle; raise BundleError naming the first thing that is wrong.

    ``check_external_data`` parses ONNX models (needs the ``onnx`` package, host side) to
    refuse external-data references that leave the bundle. The device skips it: it loads
    models from bytes, where no external reference can reach a file at all, and the onnx
    package (tens of MB resident) is not installed there."""
    members = _read_members(source, limits or Limits())
    if MANIFEST_NAME not in members:
        raise BundleError(f"bundle has no {MANIFEST_NAME}")
    if SIGNATURE_NAME not in members:
        raise BundleError(f"bundle is unsigned: no {SIGNATURE_NAME}")
    manifest_bytes, signature = members.pop(MANIFEST_NAME), members.pop(SIGNATURE_NAME)

    keys = list(trusted_keys)
    if not keys:
        raise BundleError("no trusted public keys given; cannot verify the signature")
    signer = None
    for key in keys:
        try:
            key.verify(signature, manifest_bytes)
            signer = key_id(key)
            break
        except InvalidSignature:
            continue
    if signer is None:
        raise BundleError("signature does not verify against any trusted key (wrong key or tampered manifest)")

    try:
        manifest = BundleManifest.model_validate_json(manifest_bytes)
    except ValidationError as e:
        raise BundleError(f"manifest is signed but invalid: {e}") from e

    listed = {e.path: e for e in manifest.files}
    for name in members:
        if name not in listed:
            raise BundleError(f"member {name!r} is not listed in the manifest")
    for name, entry in listed.items():
        if name not in members:
            raise BundleError(f"manifest lists {name!r} but the bundle does not contain it")
        data = members[name]
        if len(data) != entry.size:
            raise BundleError(f"{name!r} is {len(data)} bytes, manifest says {entry.size}")
        if sha256_bytes(data) != entry.sha256:
            raise BundleError(f"{name!r} sha256 mismatch: the file was modified after signing")
    if manifest.model not in members:
        raise BundleError(f"manifest model {manifest.model!r} is not in the bundle")
    bundle = Bundle(manifest, members, source if isinstance(source, Path) else None, signer)
    if check_external_data:
        _check_external_data(bundle)
    return bundle


def _check_external_data(bundle: Bundle) -> None:
    """ONNX tensors stored outside the model file must point at files inside the bundle.

    The device loads models from bytes, so an external reference cannot reach the file system
    at all; where the ``onnx`` package is installed (the host) the references are checked too.
    """
    if not bundle.manifest.model.endswith(".onnx"):
        return
    try:
        import onnx
    except ImportError:
        return
    try:
        model = onnx.load_model_from_string(bundle.model_bytes)
    except Exception as e:  # protobuf raises its own DecodeError
        raise BundleError(f"model {bundle.manifest.model!r} is not a valid ONNX protobuf: {e}") from e
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        try:
            _check_member_name(location)
        except BundleError as e:
            raise BundleError(f"tensor {tensor.name!r} has external data outside the bundle: {e}") from e
        if location not in bundle.files:
            raise BundleError(f"tensor {tensor.name!r} refers to external data {location!r} not in the bundle")


def peek_manifest(source: Path | bytes, limits: Limits | None = None) -> BundleManifest:
    """The manifest of a bundle WITHOUT verifying it: only for showing what a bundle claims."""
    members = _read_members(source, limits or Limits())
    if MANIFEST_NAME not in members:
        raise BundleError(f"bundle has no {MANIFEST_NAME}")
    try:
        return BundleManifest.model_validate_json(members[MANIFEST_NAME])
    except ValidationError as e:
        raise BundleError(f"manifest is invalid: {e}") from e
