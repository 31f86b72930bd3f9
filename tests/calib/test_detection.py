"""YOLOX decode and class-aware NMS on crafted outputs with known boxes."""

from __future__ import annotations

import numpy as np
import pytest

from calib import detection as det

INPUT = (64, 96)  # h, w → grids 8x12, 4x6, 2x3 = 96 + 24 + 6 anchors
N = 96 + 24 + 6


def _anchor(stride, gx, gy):
    offsets = {8: 0, 16: 96, 32: 120}
    width = INPUT[1] // stride
    return offsets[stride] + gy * width + gx


def _raw_for_box(cx, cy, w, h, stride, gx, gy):
    """Raw YOLOX regression values that decode to the given pixel box."""
    return [cx / stride - gx, cy / stride - gy, np.log(w / stride), np.log(h / stride)]


def _pred(entries, classes=3):
    pred = np.zeros((1, N, 5 + classes), np.float32)
    pred[0, :, 2:4] = -5.0  # tiny boxes elsewhere
    for (stride, gx, gy), box, obj, cls, cls_score in entries:
        a = _anchor(stride, gx, gy)
        pred[0, a, :4] = _raw_for_box(*box, stride, gx, gy)
        pred[0, a, 4] = obj
        pred[0, a, 5 + cls] = cls_score
    return pred


def test_grids_follow_stride_order_and_row_major():
    grid, stride = det.yolox_grids(INPUT)
    assert grid.shape == (N, 2) and stride.shape == (N,)
    assert list(stride[[0, 95, 96, 119, 120, 125]]) == [8, 8, 16, 16, 32, 32]
    assert grid[1].tolist() == [1, 0] and grid[12].tolist() == [0, 1]  # x fastest
    assert grid[_anchor(16, 5, 3)].tolist() == [5, 3]


def test_decode_recovers_known_boxes():
    pred = _pred([((8, 3, 2), (28.0, 20.0, 16.0, 8.0), 0.9, 1, 0.8), ((32, 2, 1), (80.0, 48.0, 40.0, 30.0), 0.5, 2, 0.9)])
    boxes, scores = det.decode(pred, "yolox", INPUT)
    a, b = _anchor(8, 3, 2), _anchor(32, 2, 1)
    np.testing.assert_allclose(boxes[a], [20, 16, 36, 24], atol=1e-4)
    np.testing.assert_allclose(boxes[b], [60, 33, 100, 63], atol=1e-4)
    assert scores.shape == (N, 3)
    np.testing.assert_allclose(scores[a], [0, 0.72, 0], atol=1e-6)  # obj × cls
    with pytest.raises(ValueError, match="anchors"):
        det.decode(pred, "yolox", (32, 32))


def test_postprocess_nms_is_class_aware():
    box = (40.0, 32.0, 20.0, 20.0)
    shifted = (42.0, 33.0, 20.0, 20.0)  # IoU with box ≈ 0.75
    pred = _pred(
        [
            ((8, 5, 4), box, 1.0, 0, 0.9),  # kept
            ((8, 4, 4), shifted, 1.0, 0, 0.8),  # same class, overlapping → suppressed
            ((16, 2, 2), shifted, 1.0, 1, 0.7),  # other class, same place → kept
            ((32, 0, 0), (10.0, 10.0, 8.0, 8.0), 1.0, 2, 0.2),  # below threshold
        ]
    )
    (dets,) = det.postprocess(pred, "yolox", INPUT, score_threshold=0.25, iou_threshold=0.5)
    assert len(dets) == 2
    assert dets.classes.tolist() == [0, 1]
    np.testing.assert_allclose(dets.scores, [0.9, 0.7], atol=1e-6)
    np.testing.assert_allclose(dets.boxes[0], [30, 22, 50, 42], atol=1e-4)
    (agnostic,) = det.postprocess(pred, "yolox", INPUT, score_threshold=0.25, iou_threshold=0.5, class_agnostic=True)
    assert len(agnostic) == 1
    (top1,) = det.postprocess(pred, "yolox", INPUT, score_threshold=0.25, iou_threshold=0.5, max_detections=1)
    assert len(top1) == 1 and top1.scores[0] == pytest.approx(0.9)
    assert det.postprocess(np.zeros((1, N, 8), np.float32), "yolox", INPUT)[0].boxes.shape == (0, 4)


def test_yolov5_and_yolov8_layouts():
    v5 = np.zeros((2, 5 + 2), np.float32)
    v5[0] = [50, 50, 20, 10, 0.9, 0.1, 0.8]
    v5[1] = [10, 10, 4, 4, 0.1, 0.9, 0.1]
    (d5,) = det.postprocess(v5, "yolov5", score_threshold=0.3)
    assert d5.classes.tolist() == [1] and d5.boxes[0].tolist() == [40, 45, 60, 55]
    v8 = np.zeros((1, 4 + 2, 3), np.float32)
    v8[0, :, 1] = [30, 30, 10, 10, 0.2, 0.95]
    (d8,) = det.postprocess(v8, "yolov8", score_threshold=0.5)
    assert d8.classes.tolist() == [1] and d8.boxes[0].tolist() == [25, 25, 35, 35]


def test_iou_matching_and_unletterbox():
    a = det.Detections(np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32), np.array([0.9, 0.8], np.float32), np.array([1, 2]))
    b = det.Detections(np.array([[1, 0, 11, 10], [20, 20, 30, 30]], np.float32), np.array([0.7, 0.6], np.float32), np.array([1, 3]))
    assert det.box_iou(a.boxes, b.boxes)[0, 0] == pytest.approx(90 / 110)
    assert det.match_f1(a, b) == (1, 2, 2)  # second pair differs in class
    back = det.unletterbox(np.array([[10, 20, 30, 40]], np.float32), ratio=0.5, image_hw=(70, 50))
    assert back.tolist() == [[20, 40, 50, 70]]
    assert det.nms(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), 0.5).shape == (0,)
