"""Tiny ONNX models built in code, so tests need no downloaded files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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


# A YOLOv8-layout detector whose output ignores the image: [N, 4 + 2 classes, 3 anchors], boxes
# as (cx, cy, w, h) in its 64x64 input. Anchor 1 overlaps anchor 0 (same class, lower score: NMS
# drops it); anchor 2 is class 1. With DETECTOR_CONFIG the expected detections are known exactly.
DETECTOR_ANCHORS = np.array([
    [32, 33, 10], [32, 32, 20], [20, 20, 8], [10, 10, 8],   # cx, cy, w, h
    [0.9, 0.8, 0.2], [0.1, 0.1, 0.7],                       # class scores
], np.float32)[None]

DETECTOR_CONFIG = """max_batch = 4
[preprocess]
input = "image"
size = [64, 64]
resize = "letterbox"
anchor = "center"
pad_value = 114
color = "RGB"
scale = 0.00392156862745098
[postprocess]
kind = "yolo"
variant = "yolov8"
score_threshold = 0.5
iou_threshold = 0.5
max_detections = 5
"""


def fixed_detector(path: Path) -> Path:
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 64, 64])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["N", 6, 3])
    nodes = [
        helper.make_node("ReduceSum", ["images", "axes"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Reshape", ["z", "shape"], ["z3"]),
        helper.make_node("Add", ["z3", "anchors"], ["output0"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(DETECTOR_ANCHORS, "anchors")]
    return _save(helper.make_graph(nodes, "fixed_detector", [x], [y], inits), path)


def ort_quantize_static(model: Path, calib_npz: Path, dst: Path) -> onnx.ModelProto:
    """The digits model (``model``) quantized by ONNX Runtime's quantize_static in QDQ format, TensorRT-style
    (symmetric S8 activations and per-channel weights), calibrated on the first 128 samples of ``calib_npz``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    with np.load(calib_npz) as z:
        x = (z["x"][:128].astype(np.float32) / 16).reshape(-1, 1, 8, 8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": x[i : i + 32]} for i in range(0, len(x), 32)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(model), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return onnx.load(str(dst))
