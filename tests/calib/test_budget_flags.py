"""Budget and detection flags of ``tegrad evaluate`` / ``sensitivity``, and the classifier presets."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calib.cli import build_parser, main, spec_from_args


def _constant_detector(path, boxes: list[list[float]]) -> str:
    """A YOLOv5-layout model whose output is ``boxes`` whatever the input (one image per batch)."""
    const = np.asarray([boxes], np.float32)  # [1, anchors, 6]: cx cy w h obj cls
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=1),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Reshape", ["z", "shape"], ["z3"]),
        helper.make_node("Add", ["z3", "boxes"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
             numpy_helper.from_array(const, "boxes")]
    graph = helper.make_graph(nodes, "det", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", len(boxes), 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, path)
    return str(path)


@pytest.fixture()
def detectors(tmp_path):
    ref = _constant_detector(tmp_path / "ref.onnx", [[10, 10, 4, 4, 0.9, 1.0], [30, 30, 4, 4, 0.5, 1.0]])
    cand = _constant_detector(tmp_path / "cand.onnx", [[10, 10, 4, 4, 0.9, 1.0], [30, 30, 4, 4, 0.4, 1.0]])
    (tmp_path / "config.toml").write_text('[postprocess]\nkind = "yolo"\nvariant = "yolov5"\nscore_threshold = 0.3\n')
    np.save(tmp_path / "x.npy", np.ones((4, 1), np.float32))
    return tmp_path, ref, cand


def _evaluate(tmp, ref, cand, *flags) -> tuple[int, dict]:
    out = tmp / "e.json"
    rc = main(["evaluate", ref, cand, "--data", str(tmp / "x.npy"), "--config", str(tmp / "config.toml"),
               "--json", str(out), *flags])
    return rc, json.loads(out.read_text())


def test_score_threshold_flag_reaches_the_matching(detectors) -> None:
    tmp, ref, cand = detectors
    rc, doc = _evaluate(tmp, ref, cand)  # the config's 0.3 keeps both boxes of both models
    assert rc == 0 and doc["f1"] == pytest.approx(1.0) and "budget" not in doc
    rc, doc = _evaluate(tmp, ref, cand, "--score-threshold", "0.45")  # the candidate's second box drops out
    assert doc["detections_reference"] == 2 and doc["detections_candidate"] == 1
    assert doc["f1"] == pytest.approx(2 / 3)
    rc, doc = _evaluate(tmp, ref, cand, "--score-threshold", "0.45", "--min-f1", "0.9")
    assert rc == 3 and doc["budget"]["met"] is False
    rc, doc = _evaluate(tmp, ref, cand, "--score-threshold", "0.45", "--min-f1", "0.6")
    assert rc == 0 and doc["budget"]["met"] is True


def test_match_and_nms_thresholds_are_checked(detectors, capsys) -> None:
    tmp, ref, cand = detectors
    assert main(["evaluate", ref, cand, "--data", str(tmp / "x.npy"), "--config", str(tmp / "config.toml"),
                 "--iou-threshold", "1.5"]) == 2
    assert "--iou-threshold 1.5 must be between 0 and 1" in capsys.readouterr().err
    # A stricter match IoU than the boxes' overlap (identical boxes: IoU 1) still matches.
    rc, doc = _evaluate(tmp, ref, cand, "--match-iou", "0.99")
    assert rc == 0 and doc["f1"] == pytest.approx(1.0)


def test_evaluate_target_drop_for_classifiers(tmp_path) -> None:
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "id",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32))
    out = tmp_path / "e.json"
    assert main(["evaluate", str(path), str(path), "--data", str(tmp_path / "x.npy"), "--target-drop", "0",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["budget"] == {"text": "drop 0.0 points <= 0", "drop": 0.0, "met": True}


@pytest.mark.parametrize(("argv", "size", "short"), [
    (["--preset", "efficientnet-lite1"], 240, 272),
    (["--preset", "efficientnet-lite2"], 260, 292),
    (["--preset", "efficientnet-lite4"], 300, 332),
    (["--preset", "imagenet", "--size", "240"], 240, 274),  # the 0.875 crop ratio carries over
    (["--preset", "efficientnet-lite0", "--size", "260"], 260, 297),
])
def test_classifier_presets(argv, size, short) -> None:
    args = build_parser().parse_args(["evaluate", "a.onnx", "b.onnx", "--data", "x", *argv])
    spec = spec_from_args(args)
    assert tuple(spec.size) == (size, size) and spec.resize_short == short and spec.resize == "center-crop"


def test_sensitivity_on_a_detector_plans_with_the_default_min_f1(tmp_path) -> None:
    # The budget is resolved once: the detector default F1 >= 0.95, not 1 - (the classifier's 2-point drop).
    import calib_graphs as G

    model = tmp_path / "head.onnx"
    onnx.save(G.yolo_head(), model)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    (tmp_path / "config.toml").write_text('[postprocess]\nkind = "yolo"\nvariant = "yolov5"\nscore_threshold = 0.3\n')
    cache = tmp_path / "head.calib.json"
    assert main(["calibrate", str(model), "--data", str(tmp_path / "x.npy"), "--algorithm", "max", "-o", str(cache),
                 "--no-progress"]) == 0
    out = tmp_path / "s.json"
    assert main(["sensitivity", str(model), "--cache", str(cache), "--data", str(tmp_path / "x.npy"),
                 "--config", str(tmp_path / "config.toml"), "--no-progress", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["plan"]["budget"] == "F1 vs FP32 detections >= 0.95"
