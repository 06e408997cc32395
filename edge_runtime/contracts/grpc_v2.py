"""The Open Inference Protocol v2 over gRPC (KServe's ``grpc_predict_v2.proto``, the subset of
Triton's ``grpc_service.proto`` that every v2 client speaks): package ``inference``, service
``GRPCInferenceService``, with the same field numbers, so ``tritonclient.grpc`` works unchanged.

The schema is built here in code (a FileDescriptorProto in a private descriptor pool) instead of
generated ``_pb2`` modules: no protoc at build time, no coupling of generated code to one
protobuf runtime version, and no clash with a client library registering the same names in the
default pool of the same process. Needs the ``grpc`` extra (grpcio, protobuf).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from edge_runtime.contracts.oip import OIP_TO_NUMPY, ProtocolError

SERVICE = "inference.GRPCInferenceService"
T = {"bool": 8, "int64": 3, "uint64": 4, "int32": 5, "uint32": 13, "float": 2, "double": 1, "string": 9,
     "bytes": 12, "message": 11}  # fmt: skip
OPTIONAL, REPEATED = 1, 3

# (message, [(field, number, type, repeated, message type)], nested messages)
Field = tuple[str, int, str, bool, str]
PARAMS: Field = ("parameters", 4, "message", True, "ParametersEntry")
TENSOR_META: list[Field] = [("name", 1, "string", False, ""), ("datatype", 2, "string", False, ""),
                            ("shape", 3, "int64", True, "")]  # fmt: skip
SCHEMA: list[tuple[str, list[Field], list[tuple[str, list[Field]]]]] = [
    ("ServerLiveRequest", [], []),
    ("ServerLiveResponse", [("live", 1, "bool", False, "")], []),
    ("ServerReadyRequest", [], []),
    ("ServerReadyResponse", [("ready", 1, "bool", False, "")], []),
    ("ModelReadyRequest", [("name", 1, "string", False, ""), ("version", 2, "string", False, "")], []),
    ("ModelReadyResponse", [("ready", 1, "bool", False, "")], []),
    ("ServerMetadataRequest", [], []),
    (
        "ServerMetadataResponse",
        [("name", 1, "string", False, ""), ("version", 2, "string", False, ""), ("extensions", 3, "string", True, "")],
        [],
    ),
    ("ModelMetadataRequest", [("name", 1, "string", False, ""), ("version", 2, "string", False, "")], []),
    (
        "ModelMetadataResponse",
        [
            ("name", 1, "string", False, ""),
            ("versions", 2, "string", True, ""),
            ("platform", 3, "string", False, ""),
            ("inputs", 4, "message", True, ".inference.ModelMetadataResponse.TensorMetadata"),
            ("outputs", 5, "message", True, ".inference.ModelMetadataResponse.TensorMetadata"),
        ],
        [("TensorMetadata", TENSOR_META)],
    ),
    (
        "InferParameter",
        [
            ("bool_param", 1, "bool", False, ""),
            ("int64_param", 2, "int64", False, ""),
            ("string_param", 3, "string", False, ""),
            ("double_param", 4, "double", False, ""),
            ("uint64_param", 5, "uint64", False, ""),
        ],
        [],
    ),
    (
        "InferTensorContents",
        [
            ("bool_contents", 1, "bool", True, ""),
            ("int_contents", 2, "int32", True, ""),
            ("int64_contents", 3, "int64", True, ""),
            ("uint_contents", 4, "uint32", True, ""),
            ("uint64_contents", 5, "uint64", True, ""),
            ("fp32_contents", 6, "float", True, ""),
            ("fp64_contents", 7, "double", True, ""),
            ("bytes_contents", 8, "bytes", True, ""),
        ],
        [],
    ),
    (
        "ModelInferRequest",
        [
            ("model_name", 1, "string", False, ""),
            ("model_version", 2, "string", False, ""),
            ("id", 3, "string", False, ""),
            PARAMS,
            ("inputs", 5, "message", True, ".inference.ModelInferRequest.InferInputTensor"),
            ("outputs", 6, "message", True, ".inference.ModelInferRequest.InferRequestedOutputTensor"),
            ("raw_input_contents", 7, "bytes", True, ""),
        ],
        [
            (
                "InferInputTensor",
                [*TENSOR_META, PARAMS, ("contents", 5, "message", False, ".inference.InferTensorContents")],
            ),
            (
                "InferRequestedOutputTensor",
                [("name", 1, "string", False, ""), ("parameters", 2, "message", True, "ParametersEntry")],
            ),
        ],
    ),
    (
        "ModelInferResponse",
        [
            ("model_name", 1, "string", False, ""),
            ("model_version", 2, "string", False, ""),
            ("id", 3, "string", False, ""),
            PARAMS,
            ("outputs", 5, "message", True, ".inference.ModelInferResponse.InferOutputTensor"),
            ("raw_output_contents", 6, "bytes", True, ""),
        ],
        [
            (
                "InferOutputTensor",
                [*TENSOR_META, PARAMS, ("contents", 5, "message", False, ".inference.InferTensorContents")],
            )
        ],
    ),
]
RPCS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
# The oneof of InferParameter (a parameter holds one value).
ONEOF = ("InferParameter", "parameter_choice")


def _message(d: Any, name: str, fields: list[Field], scope: str) -> None:
    from google.protobuf import descriptor_pb2

    d.name = name
    entries: dict[str, Any] = {}
    for fname, number, ftype, repeated, type_name in fields:
        f = d.field.add(name=fname, number=number, type=T[ftype], label=REPEATED if repeated else OPTIONAL)
        if type_name == "ParametersEntry":  # map<string, InferParameter>
            entry = fname[0].upper() + fname[1:] + "Entry"
            f.type_name = f"{scope}.{name}.{entry}"
            if entry not in entries:
                e = d.nested_type.add(name=entry)
                e.field.add(name="key", number=1, type=T["string"], label=OPTIONAL)
                e.field.add(name="value", number=2, type=T["message"], label=OPTIONAL,
                            type_name=".inference.InferParameter")  # fmt: skip
                e.options.CopyFrom(descriptor_pb2.MessageOptions(map_entry=True))
                entries[entry] = e
        elif type_name:
            f.type_name = type_name
    if name == ONEOF[0]:
        d.oneof_decl.add(name=ONEOF[1])
        for f in d.field:
            f.oneof_index = 0


@cache
def messages() -> dict[str, Any]:
    """The message classes by name (``ModelInferRequest``, ...), built once."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fd = descriptor_pb2.FileDescriptorProto(name="edgert/grpc_predict_v2.proto", package="inference", syntax="proto3")
    for name, fields, nested in SCHEMA:
        d = fd.message_type.add()
        _message(d, name, fields, ".inference")
        for nname, nfields in nested:
            _message(d.nested_type.add(), nname, nfields, f".inference.{name}")
    svc = fd.service.add(name="GRPCInferenceService")
    for rpc in RPCS:
        svc.method.add(name=rpc, input_type=f".inference.{rpc}Request", output_type=f".inference.{rpc}Response")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fd.SerializeToString())
    out = {}
    for name, _, _ in SCHEMA:
        out[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
    return out


# Typed contents field per datatype (raw_input_contents is what most clients send).
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}  # fmt: skip


def decode_infer_request(req: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """ModelInferRequest -> (request as the HTTP JSON would be, input arrays by name); errors are
    ProtocolError with the same messages as over HTTP."""
    if not req.inputs:
        raise ProtocolError("request must have a non-empty 'inputs' list")
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise ProtocolError(f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs; expected one per input")
    feeds: dict[str, np.ndarray] = {}
    for i, t in enumerate(req.inputs):
        name, datatype, shape = t.name, t.datatype, [int(d) for d in t.shape]
        if datatype not in OIP_TO_NUMPY:
            raise ProtocolError(
                f"input {name!r}: datatype {datatype!r} unsupported; expected one of {sorted(OIP_TO_NUMPY)}"
            )
        if any(d < 0 for d in shape):
            raise ProtocolError(f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}")
        if name in feeds:
            raise ProtocolError(f"input {name!r} given twice")
        dtype = np.dtype(OIP_TO_NUMPY[datatype])
        count = int(np.prod(shape)) if shape else 1
        if raw:
            blob = raw[i]
            if len(blob) != count * dtype.itemsize:
                raise ProtocolError(f"input {name!r}: {len(blob)} raw bytes do not match shape {shape} of {datatype} "
                                    f"({count * dtype.itemsize} bytes)")  # fmt: skip
            arr = np.frombuffer(blob, dtype=dtype).reshape(shape)
        else:
            field = CONTENTS.get(datatype)
            values = getattr(t.contents, field) if field else []
            if len(values) != count:
                raise ProtocolError(f"input {name!r}: {len(values)} values given, shape {shape} needs {count}")
            arr = np.asarray(values, dtype=dtype).reshape(shape)
        feeds[name] = arr
    request: dict[str, Any] = {"outputs": [{"name": o.name} for o in req.outputs]}
    if req.id:
        request["id"] = req.id
    timeout = req.parameters.get("timeout_ms") if "timeout_ms" in req.parameters else None
    if timeout is not None:
        request["parameters"] = {"timeout_ms": timeout.int64_param or timeout.double_param}
    return request, feeds


def encode_infer_response(model: str, version: str, request: dict[str, Any], outputs: dict[str, np.ndarray]) -> Any:
    from edge_runtime.contracts.oip import NUMPY_TO_OIP

    resp = messages()["ModelInferResponse"](model_name=model, model_version=version)
    if "id" in request:
        resp.id = request["id"]
    names = [o["name"] for o in request.get("outputs") or []] or list(outputs)
    for name in names:
        arr = np.ascontiguousarray(outputs[name])
        out = resp.outputs.add(name=name, datatype=NUMPY_TO_OIP.get(arr.dtype.name, "FP32"))
        out.shape.extend(arr.shape)
        resp.raw_output_contents.append(arr.tobytes())
    return resp
