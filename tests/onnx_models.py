"""Tiny ONNX models built in code, so tests need no downloaded files."""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _save(graph, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def identity(path: Path, datatype: str, shape=("N", 4)) -> Path:
    """y = x for one KServe datatype; the leading dim is dynamic."""
    t = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", t, list(shape))],
        [helper.make_tensor_value_info("y", t, list(shape))],
    )
    return _save(graph, path)


def add_sub(path: Path, dims=("N", -1)) -> Path:
    """Two FP32 inputs a, b -> sum = a + b, diff = a - b (second dim variable)."""
    shape = [d if d != -1 else "W" for d in dims]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])],
        "add_sub",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("sum", "diff")],
    )
    return _save(graph, path)


def scale(path: Path, factor: float, shape=("N", 4)) -> Path:
    """y = x * factor: versions of one model that answer differently."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
        initializer=[helper.make_tensor("k", TensorProto.FLOAT, [], [factor])],
    )
    return _save(graph, path)


def slow(path: Path, loops: int = 64, size: int = 256) -> Path:
    """A model that takes a few milliseconds: a chain of MatMuls on [N, size]."""
    import numpy as np

    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(loops):
        w = (rng.standard_normal((size, size)) / np.sqrt(size)).astype("float32")
        inits.append(helper.make_tensor(f"w{i}", TensorProto.FLOAT, w.shape, w.tobytes(), raw=True))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", size])],
        initializer=inits,
    )
    return _save(graph, path)
