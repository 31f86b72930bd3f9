"""Tiny ONNX graphs for the lowering tests, built with onnx.helper, plus amax observation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from calib.ort_exact import keep_exact

OPSET = 13


def _model(nodes, inputs, outputs, inits, opset=OPSET) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)
    return model


def _w(name, shape, rng, scale=0.3):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _x(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_bn_relu(seed=0, opset=OPSET) -> onnx.ModelProto:
    """x → Conv → BatchNorm → Relu → MaxPool → Conv → y."""
    rng = np.random.default_rng(seed)
    inits = [
        _w("w1", [8, 3, 3, 3], rng),
        _w("b1", [8], rng, 0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_scale"),
        _w("bn_bias", [8], rng, 0.1),
        _w("bn_mean", [8], rng, 0.1),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "bn_var"),
        _w("w2", [4, 8, 1, 1], rng),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2"], ["y"], name="conv2"),
    ]
    return _model(nodes, [_x("x", ["N", 3, 8, 8])], [_x("y", ["N", 4, 4, 4])], inits, opset)


def residual(seed=0) -> onnx.ModelProto:
    """x → Conv → Relu = a;  a → Conv → Relu → Conv = b;  y = Add(b, a) → Relu → Conv."""
    rng = np.random.default_rng(seed)
    inits = [_w("w0", [8, 3, 3, 3], rng), _w("w1", [8, 8, 3, 3], rng), _w("w2", [8, 8, 1, 1], rng), _w("w3", [2, 8, 1, 1], rng)]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["a"], name="relu0"),
        helper.make_node("Conv", ["a", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["b"], name="conv2"),
        helper.make_node("Add", ["b", "a"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["y"], name="conv3"),
    ]
    return _model(nodes, [_x("x", ["N", 3, 6, 6])], [_x("y", ["N", 2, 6, 6])], inits)


def gemm_matmul(seed=0) -> onnx.ModelProto:
    """x[N,16] → Gemm(transB=1) → Relu → MatMul(W[32,8]) → Gemm(transB=0) → y."""
    rng = np.random.default_rng(seed)
    inits = [_w("wg", [32, 16], rng), _w("bg", [32], rng, 0.1), _w("wm", [32, 8], rng), _w("wt", [8, 5], rng), _w("bt", [5], rng, 0.1)]
    nodes = [
        helper.make_node("Gemm", ["x", "wg", "bg"], ["g"], name="fc1", transB=1),
        helper.make_node("Relu", ["g"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "wm"], ["m"], name="matmul"),
        helper.make_node("Gemm", ["m", "wt", "bt"], ["y"], name="fc2"),
    ]
    return _model(nodes, [_x("x", ["N", 16])], [_x("y", ["N", 5])], inits)


def conv_transpose(seed=0) -> onnx.ModelProto:
    """x → Conv → Relu → ConvTranspose(stride 2) → y."""
    rng = np.random.default_rng(seed)
    inits = [_w("w0", [6, 3, 3, 3], rng), _w("wt", [6, 4, 2, 2], rng), _w("bt", [4], rng, 0.1)]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
        helper.make_node("ConvTranspose", ["r0", "wt", "bt"], ["y"], name="deconv", strides=[2, 2]),
    ]
    return _model(nodes, [_x("x", ["N", 3, 5, 5])], [_x("y", ["N", 4, 10, 10])], inits)


def softmax_head(seed=0) -> onnx.ModelProto:
    """x → Conv → Exp → ReduceSum → ... → Softmax: ops that FP16 lowering keeps in FP32."""
    rng = np.random.default_rng(seed)
    inits = [_w("w0", [4, 3, 3, 3], rng), numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Exp", ["c0"], ["e"], name="exp"),
        helper.make_node("ReduceSum", ["e", "axes"], ["s"], name="rsum", keepdims=0),
        helper.make_node("Softmax", ["s"], ["y"], name="softmax", axis=1),
    ]
    return _model(nodes, [_x("x", ["N", 3, 6, 6])], [_x("y", ["N", 4])], inits)


def run(model: onnx.ModelProto, feeds) -> list[np.ndarray]:
    # As calib.evaluate runs them: TensorRT-form (S8) graphs without ORT's saturating fusion.
    options = keep_exact(ort.SessionOptions(), model)
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    if isinstance(feeds, np.ndarray):
        feeds = {sess.get_inputs()[0].name: feeds}
    return sess.run(None, feeds)


def observe_amax(model: onnx.ModelProto, x: np.ndarray, tensors) -> dict[str, float]:
    """Plain max |x| of ``tensors`` on ``x`` (calibration stand-in for the tests)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in outputs:
            m.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x}), strict=True))
    return {t: float(np.abs(values[t]).max()) for t in tensors}


def yolo_head(spread: float = 2.0, act: str = "silu", classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """A YOLO-style detector head, as YOLOX/YOLOv5/YOLOv8 end.

    x → stem Conv (output channel gains 1 … ``spread``) → act → depthwise Conv → act →
    Conv → act = f;  f → Conv "reg" (4 box values);  f → Conv "obj" → Sigmoid;
    f → Conv "cls" → Sigmoid;  Concat(reg, obj, cls) → Reshape → Transpose → y [N, anchors, 5 + C].
    ``act``: "silu" (x · Sigmoid(x)) or "relu6" (Clip 0..6).
    """
    rng = np.random.default_rng(seed)
    gains = np.geomspace(1.0, spread, 16, dtype=np.float32)[:, None, None, None]
    w0 = (rng.standard_normal((16, 3, 3, 3)) * 0.3).astype(np.float32) * gains
    inits = [
        numpy_helper.from_array(w0, "w_stem"),
        _w("w_dw", [16, 1, 3, 3], rng),
        _w("w_pw", [16, 16, 1, 1], rng),
        _w("w_reg", [4, 16, 1, 1], rng),
        _w("b_reg", [4], rng, 0.1),
        _w("w_obj", [1, 16, 1, 1], rng),
        _w("w_cls", [classes, 16, 1, 1], rng),
        numpy_helper.from_array(np.array([0, 5 + classes, -1], np.int64), "anchors_shape"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = []

    def activation(src: str, name: str) -> str:
        if act == "relu6":
            nodes.append(helper.make_node("Clip", [src, "lo", "hi"], [f"{name}_out"], name=name))
        else:
            nodes.append(helper.make_node("Sigmoid", [src], [f"{name}_sig"], name=f"{name}_sigmoid"))
            nodes.append(helper.make_node("Mul", [src, f"{name}_sig"], [f"{name}_out"], name=name))
        return f"{name}_out"

    nodes.append(helper.make_node("Conv", ["x", "w_stem"], ["c_stem"], name="stem", pads=[1, 1, 1, 1]))
    a0 = activation("c_stem", "act_stem")
    nodes.append(helper.make_node("Conv", [a0, "w_dw"], ["c_dw"], name="dw", group=16, pads=[1, 1, 1, 1]))
    a1 = activation("c_dw", "act_dw")
    nodes.append(helper.make_node("Conv", [a1, "w_pw"], ["c_pw"], name="pw"))
    f = activation("c_pw", "act_pw")
    nodes += [
        helper.make_node("Conv", [f, "w_reg", "b_reg"], ["reg"], name="reg"),
        helper.make_node("Conv", [f, "w_obj"], ["obj_logit"], name="obj"),
        helper.make_node("Sigmoid", ["obj_logit"], ["obj"], name="obj_sigmoid"),
        helper.make_node("Conv", [f, "w_cls"], ["cls_logit"], name="cls"),
        helper.make_node("Sigmoid", ["cls_logit"], ["cls"], name="cls_sigmoid"),
        helper.make_node("Concat", ["reg", "obj", "cls"], ["pred"], name="head_concat", axis=1),
        helper.make_node("Reshape", ["pred", "anchors_shape"], ["flat"], name="flatten_anchors"),
        helper.make_node("Transpose", ["flat"], ["y"], name="to_output", perm=[0, 2, 1]),
    ]
    return _model(nodes, [_x("x", [1, 3, 8, 8])], [_x("y", [1, 64, 5 + classes])], inits)
