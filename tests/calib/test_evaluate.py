"""evaluate(): metrics on crafted models whose outputs are known."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.evaluate import compare_outputs, evaluate


def _linear(weight: np.ndarray, name="logits") -> onnx.ModelProto:
    w = numpy_helper.from_array(weight.astype(np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], [name])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", weight.shape[0]])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", weight.shape[1]])],
        [w],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    return m


def test_classification_metrics_against_reference_and_labels(tmp_path):
    eye = np.eye(3, dtype=np.float32)
    swap = eye[:, [0, 2, 1]]  # candidate swaps classes 1 and 2
    x = np.array([[3, 1, 0], [0, 2, 1], [0, 1, 2], [5, 0, 0]], np.float32)
    labels = np.array([0, 1, 1, 0])
    path = tmp_path / "ref.onnx"
    onnx.save(_linear(eye), path)
    same = evaluate(path, _linear(eye), [x[:2], x[2:]], labels=labels)
    assert same.top1_agreement == 1.0 and same.cosine == pytest.approx(1.0) and same.rel_error == 0.0
    assert same.accuracy_reference == same.accuracy_candidate == 0.75
    r = evaluate(_linear(eye), _linear(swap), [{"x": x[:2]}, {"x": x[2:]}], labels=[labels[:2], labels[2:]])
    assert r.samples == 4
    assert r.top1_agreement == 0.5  # rows 1 and 2 flip
    assert r.accuracy_reference == 0.75 and r.accuracy_candidate == 0.75
    expected_cos = np.mean([9 / 10, 4 / 5, 4 / 5, 1.0])
    assert r.cosine == pytest.approx(expected_cos, rel=1e-6)
    expected_err = np.mean([np.sqrt(2 / 10), np.sqrt(2 / 5), np.sqrt(2 / 5), 0.0])
    assert r.rel_error == pytest.approx(expected_err, rel=1e-6)
    d = r.as_dict()
    assert d["top1_agreement"] == 0.5 and d["accuracy_drop"] == 0.0 and "f1" not in d


def _det_output(boxes):
    """[1, N, 5+C] YOLOv5-style rows from (cx, cy, w, h, obj, cls, score)."""
    out = np.zeros((1, 6, 7), np.float32)
    for i, (cx, cy, w, h, obj, cls, score) in enumerate(boxes):
        out[0, i, :5] = [cx, cy, w, h, obj]
        out[0, i, 5 + cls] = score
    return out


def test_detection_f1_against_reference_detections():
    ref = _det_output([(10, 10, 10, 10, 1, 0, 0.9), (50, 50, 20, 20, 1, 1, 0.8), (80, 20, 10, 10, 1, 0, 0.7)])
    cand = _det_output(
        [
            (11, 10, 10, 10, 1, 0, 0.85),  # matches ref 0 (IoU 0.82)
            (50, 50, 20, 20, 1, 0, 0.8),  # right place, wrong class
            (30, 80, 10, 10, 1, 1, 0.6),  # spurious
        ]
    )
    r = compare_outputs([ref], [cand], task="detection", detection={"layout": "yolov5", "score_threshold": 0.3})
    assert r.detections_reference == 3 and r.detections_candidate == 3
    assert r.precision == pytest.approx(1 / 3) and r.recall == pytest.approx(1 / 3) and r.f1 == pytest.approx(1 / 3)
    both_empty = compare_outputs([np.zeros_like(ref)], [np.zeros_like(ref)], task="detection", detection={"layout": "yolov5"})
    assert both_empty.f1 == 1.0


def test_errors():
    with pytest.raises(ValueError, match="task"):
        compare_outputs([np.zeros((1, 2))], [np.zeros((1, 2))], task="segmentation")
    with pytest.raises(ValueError, match="shapes"):
        compare_outputs([np.zeros((1, 2))], [np.zeros((1, 3))])
    with pytest.raises(ValueError, match="labels"):
        compare_outputs([np.zeros((2, 2))], [np.zeros((2, 2))], labels=[0, 1, 1])


def test_detection_defaults_take_input_size_from_the_model():
    from calib.evaluate import detection_defaults

    g = helper.make_graph(
        [helper.make_node("Identity", ["images"], ["out"])],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 416, 320])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 416, 320])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    assert detection_defaults(m, None) == {"input_hw": (416, 320)}
    assert detection_defaults(m, {"input_hw": (32, 32)}) == {"input_hw": (32, 32)}
    assert detection_defaults(m, {"layout": "yolov8"}) == {"layout": "yolov8"}
