"""Detector-safe Q/DQ placement, checked on a YOLO-style head built in the test (calib_graphs.yolo_head)."""

from __future__ import annotations

import calib_graphs as G
import numpy as np
import onnx
import pytest

from calib import qdq
from calib.graph import Graph
from calib.lower import layer_precisions

HEAD_PATH = {"reg", "obj_logit", "obj", "cls_logit", "cls", "pred", "flat", "y"}


def _x(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 8, 8)).astype(np.float32)


def _lowered(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    amax = G.observe_amax(model, _x(), qdq.activation_tensors_to_quantize(model))
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    out = qdq.insert_qdq(copy, amax, target=target)
    onnx.checker.check_model(out, full_check=True)
    return out


def _quantized(model: onnx.ModelProto) -> set[str]:
    """Activation tensors that a QuantizeLinear reads."""
    inits = {i.name for i in model.graph.initializer}
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


@pytest.mark.parametrize("target", qdq.TARGETS, ids=["trt_target", "cpu_target"])
def test_head_branches_to_the_output_stay_float_and_the_prediction_convs_stay_int8(target):
    model = G.yolo_head()
    out = _lowered(model, target)
    # Box regressions and sigmoid scores meet in a Concat on their way to the output; no quantized
    # compute follows, so a Q/DQ there (one scale for [0, 1] scores and box offsets) only adds error.
    assert not _quantized(out) & HEAD_PATH
    precisions = layer_precisions(out)
    assert {precisions[n] for n in ("reg", "obj", "cls", "pw", "stem")} == {"int8"}
    # one shared pair on the feature map the three prediction convs read
    g = Graph(out)
    (feed,) = {n.input[0] for n in out.graph.node if n.name in ("reg", "obj", "cls")}
    assert g.producer[feed].op_type == "DequantizeLinear"
    ref = G.run(model, _x(5))[0]
    got = G.run(out, _x(5))[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.99


def test_depthwise_input_spread_beyond_8x_stays_float():
    # Stem gains 1 … 16: the 10th-percentile channel is ~13× below the largest, so with one
    # per-tensor scale it keeps a handful of levels in the depthwise Conv that never mixes channels.
    wide, even = G.yolo_head(spread=16.0), G.yolo_head(spread=2.0)
    assert "act_stem_out" not in qdq.activation_tensors_to_quantize(wide, target="tensorrt")
    assert "act_stem_out" in qdq.activation_tensors_to_quantize(even, target="tensorrt")
    for target in qdq.TARGETS:
        assert layer_precisions(_lowered(wide, target))["dw"] == "fp32"
        assert layer_precisions(_lowered(wide, target))["pw"] == "int8"
        assert layer_precisions(_lowered(even, target))["dw"] == "int8"


def test_a_clip_before_the_depthwise_conv_caps_the_spread():
    # ReLU6 (EfficientNet-Lite, MobileNet) bounds every channel by 6: channels whose weight bound
    # exceeds 6 all share the same range, so the same 200× gains are no reason to leave INT8.
    capped, silu = G.yolo_head(spread=200.0, act="relu6"), G.yolo_head(spread=200.0, act="silu")
    assert "act_stem_out" in qdq.activation_tensors_to_quantize(capped, target="tensorrt")
    assert "act_stem_out" not in qdq.activation_tensors_to_quantize(silu, target="tensorrt")
    assert layer_precisions(_lowered(capped, "tensorrt"))["dw"] == "int8"
