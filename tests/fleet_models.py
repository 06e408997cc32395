"""A family of small real ONNX classifiers for update tests: good versions and versions that
verify and load but misbehave (NaN outputs, 10x slower, crash on first real inference,
wildly shifted outputs). Each is a real model run by ONNX Runtime; nothing is mocked."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from edge_runtime.contracts.bundle import load_private_key, sha256_bytes, write_bundle

DIM, CLASSES = 64, 4


def classifier(variant: str = "good", seed: int = 0) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((DIM, DIM)) / np.sqrt(DIM)).astype(np.float32)
    w2 = rng.standard_normal((DIM, CLASSES)).astype(np.float32)
    if variant == "shifted":
        w2 = -w2[:, ::-1]  # same model family, answers something else entirely
    trips = 20
    t = helper.make_tensor_value_info
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c"], ["c_out"]),
            helper.make_node("MatMul", ["a", "W"], ["m"]),
            helper.make_node("Tanh", ["m"], ["a_out"]),
        ],
        "body",
        [t("i", TensorProto.INT64, []), t("c", TensorProto.BOOL, []), t("a", TensorProto.FLOAT, ["N", DIM])],
        [t("c_out", TensorProto.BOOL, []), t("a_out", TensorProto.FLOAT, ["N", DIM])],
    )
    nodes = [
        helper.make_node("Loop", ["trips", "yes", "x"], ["h"], body=body),
        helper.make_node("MatMul", ["h", "W2"], ["logits0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(trips, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "yes"),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(w2, "W2"),
    ]
    if variant == "slow" or variant.startswith("loop"):
        # The same answer at 10x the time (measured 0.28 -> ~2.9 ms): 700 more iterations, multiplied by 0.
        # loopN: N more iterations (a model of any cost with the very same answers).
        nodes[-1] = helper.make_node("MatMul", ["h", "W2"], ["logits1"])
        nodes += [
            helper.make_node("Loop", ["extra", "yes", "x"], ["h_extra"], body=body),
            helper.make_node("ReduceSum", ["h_extra"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["z"]),
            helper.make_node("Add", ["logits1", "z"], ["logits0"]),
        ]
        extra = 700 if variant == "slow" else int(variant[4:])
        inits += [numpy_helper.from_array(np.array(extra, np.int64), "extra"),
                  numpy_helper.from_array(np.array(0.0, np.float32), "zero")]  # fmt: skip
    if variant == "bad":
        # Breaks on some data only (as real regressions do): NaN when the frame's mean level is
        # above 0.7, 3000 more loop iterations (~12 ms more, same answer) between 0.45 and 0.7,
        # the good model's answers below. Simulated devices see different levels.
        nodes[-1] = helper.make_node("MatMul", ["h", "W2"], ["logits1"])
        nodes += [
            helper.make_node("ReduceMean", ["x"], ["lvl"], keepdims=0),
            helper.make_node("Greater", ["lvl", "hi"], ["is_hi"]),
            helper.make_node("Greater", ["lvl", "mid"], ["above_mid"]),
            helper.make_node("Not", ["is_hi"], ["not_hi"]),
            helper.make_node("And", ["above_mid", "not_hi"], ["is_mid"]),
            helper.make_node("Cast", ["is_mid"], ["mid_i"], to=TensorProto.INT64),
            helper.make_node("Mul", ["mid_i", "extra"], ["trips_extra"]),
            helper.make_node("Loop", ["trips_extra", "yes", "x"], ["h_extra"], body=body),
            helper.make_node("ReduceSum", ["h_extra"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["z"]),
            helper.make_node("Where", ["is_hi", "nan1", "zero"], ["poison"]),
            helper.make_node("Add", ["z", "poison"], ["zp"]),
            helper.make_node("Add", ["logits1", "zp"], ["logits"]),
        ]
        inits += [numpy_helper.from_array(np.array(3000, np.int64), "extra"),
                  numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                  numpy_helper.from_array(np.array(np.nan, np.float32), "nan1"),
                  numpy_helper.from_array(np.array(0.7, np.float32), "hi"),
                  numpy_helper.from_array(np.array(0.45, np.float32), "mid")]  # fmt: skip
    elif variant == "nan":
        nodes.append(helper.make_node("Mul", ["logits0", "nan"], ["logits"]))
        inits.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan"))
    elif variant == "crash":
        # Index = 1000 * max(x): 0 for the warm-up's zeros (loads fine), out of range for real data.
        nodes += [
            helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0),
            helper.make_node("Mul", ["mx", "k"], ["scaled"]),
            helper.make_node("Cast", ["scaled"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["g"]),
            helper.make_node("Add", ["logits0", "g"], ["logits"]),
        ]
        inits += [numpy_helper.from_array(np.array(1000.0, np.float32), "k"),
                  numpy_helper.from_array(np.zeros(1, np.float32), "table")]  # fmt: skip
    elif variant != "bad":
        nodes.append(helper.make_node("Identity", ["logits0"], ["logits"]))
    graph = helper.make_graph(
        nodes, "cls", [t("x", TensorProto.FLOAT, ["N", DIM])], [t("logits", TensorProto.FLOAT, ["N", CLASSES])], inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def make_bundle(
    out: Path,
    key: Path,
    version: str,
    variant: str = "good",
    name: str = "cls",
    target: str = "x86-cpu",
    seed: int = 0,
) -> Path:
    """variant "crash-on-load" is the crashing model warmed with real-looking data: it fails while loading."""
    model = classifier("crash" if variant == "crash-on-load" else variant, seed)
    warm = io.BytesIO()
    np.savez(warm, x=np.full((1, DIM), 0.5 if variant == "crash-on-load" else 0.0, np.float32))
    write_bundle(
        out,
        {"name": name, "version": version, "target": target, "runtime": "onnxruntime", "model": "model.onnx",
         "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", DIM]}],
         "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", CLASSES]}], "precision": "fp32",
         "batching": {"max_batch": 0, "batchable": True, "warmup": "warmup.npz"},
         "source_sha256": sha256_bytes(model), "key_id": ""},
        {"model.onnx": model, "warmup.npz": warm.getvalue()},
        load_private_key(key),
    )  # fmt: skip
    return out


def inputs(n: int = 64, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, DIM)).astype(np.float32)
