"""The JSON tensor fast path (simdjson straight into a buffer, contracts/oip.py) gives exactly what
the generic path (orjson, then numpy) gives: the same arrays, bit for bit, or the same error."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from edge_runtime.contracts import oip
from edge_runtime.contracts.oip import FAST_JSON_MIN, ProtocolError, decode_request

pytestmark = pytest.mark.unit

PAD = "p" * FAST_JSON_MIN  # an id long enough for the body to take the fast path


def _body(datatype: str, shape: list[int], data: Any) -> bytes:
    entry = {"name": "x", "datatype": datatype, "shape": shape, "data": data}
    return json.dumps({"id": PAD, "inputs": [entry], "outputs": [{"name": "y"}]}).encode()


def _decode(body: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(oip, "_simdjson", None)
        try:
            request, feeds = decode_request(memoryview(body), None)
        except ProtocolError as e:
            return ("error", str(e))
        return request, feeds


rng = np.random.default_rng(0)
CASES = [
    ("FP32", [2, 3, 4], rng.standard_normal(24).astype(np.float32).tolist()),
    ("FP32", [3], [1, 2.5, 1e308]),  # ints among floats; an overflow to inf as numpy makes it
    ("FP64", [4], [5e-324, -0.0, 1.7976931348623157e308, 0.1]),
    ("FP16", [3], [0.1, 65504, 1e-8]),
    ("INT8", [3], [-128, 0, 127]),
    ("INT8", [2], [1, 300]),  # out of range: the same error
    ("UINT8", [3], [0, 128, 255]),
    ("UINT8", [2], [-1, 3]),  # negative: simdjson declines, the generic path answers
    ("INT64", [2], [9223372036854775807, -9223372036854775808]),
    ("INT32", [2], [1.5, 2]),  # floats for an integer type: whatever numpy did before
    ("FP32", [2, 2], [[1, 2], [3, 4]]),  # nested: the generic path
    ("FP32", [3], [[1, 2], [3]]),  # ragged
    ("FP32", [2], [1, True]),  # a bool among numbers
    ("FP32", [2], [1, None]),
    ("FP32", [2], [1, "a"]),
    ("FP32", [3], [1, 2]),  # too few values
    ("BOOL", [2], [True, False]),
    ("FP32", [0], []),
]


@pytest.mark.parametrize(("datatype", "shape", "data"), CASES)
def test_the_fast_path_answers_exactly_as_the_generic_one(
    datatype: str, shape: list[int], data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _body(datatype, shape, data)
    fast, slow = _decode(body, True, monkeypatch), _decode(body, False, monkeypatch)
    if slow[0] == "error":
        assert fast == slow
        return

    def doc(request: dict[str, Any]) -> dict[str, Any]:  # the request document, data aside
        return {**request, "inputs": [{k: v for k, v in e.items() if k != "data"} for e in request["inputs"]]}

    assert doc(fast[0]) == doc(slow[0])
    for name, arr in slow[1].items():
        got = fast[1][name]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        assert np.array_equal(got, arr, equal_nan=True) and got.tobytes() == arr.tobytes()


def test_a_flat_float_tensor_takes_the_fast_path() -> None:
    x = rng.standard_normal(3000).astype(np.float32)
    request = oip._tensor_request(_body("FP32", [3000], x.tolist()))
    assert request is not None and isinstance(request["inputs"][0]["data"], np.ndarray)
    assert request["id"] == PAD and request["outputs"] == [{"name": "y"}]
    assert oip._tensor_request(b'{"inputs": [1, 2') is None  # malformed: the generic path reports it


def test_a_large_flat_json_tensor_never_reaches_the_generic_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    x = rng.standard_normal(3000).astype(np.float32)
    monkeypatch.setattr(oip, "_loads", lambda raw: pytest.fail("the generic parser ran"))
    _, feeds = decode_request(_body("FP32", [3000], x.tolist()), None)
    assert feeds["x"].tobytes() == x.tobytes()
