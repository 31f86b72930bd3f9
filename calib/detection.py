"""Detector post-processing in NumPy: YOLOX / YOLOv5 / YOLOv8 decode and class-aware NMS.

Everything is vectorised over anchors; only greedy NMS loops, once per kept box. Boxes are
``[x1, y1, x2, y2]`` in network-input pixels; :func:`unletterbox` maps them back to the
original image. The daemon's CPU post-processing uses these same functions.

Layouts (one image: ``pred`` ``[N, 5 + C]`` or ``[1, N, 5 + C]``; YOLOv8 ``[4 + C, N]``):

- ``"yolox"``: raw grid-relative boxes. For anchor ``i`` on stride ``s`` with grid cell
  ``(gx, gy)``: ``cx = (v0 + gx)·s``, ``cy = (v1 + gy)·s``, ``w = exp(v2)·s``,
  ``h = exp(v3)·s``. Anchors run over strides 8, 16, 32 in that order, each grid row-major
  (y outer, x inner). Objectness and class scores are already sigmoid-ed; score = obj × cls.
- ``"yolov5"``: ``cx, cy, w, h`` already in pixels, then obj and class scores (sigmoid-ed).
- ``"yolov8"``: ``[4 + C, N]`` (channels first), ``cx, cy, w, h`` in pixels and class scores,
  no objectness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LAYOUTS = ("yolox", "yolov5", "yolov8")


@dataclass
class Detections:
    boxes: np.ndarray  # [K, 4] float32, x1 y1 x2 y2
    scores: np.ndarray  # [K] float32, descending
    classes: np.ndarray  # [K] int64

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def as_list(self, names: Sequence[str] | None = None) -> list[dict]:
        out = []
        for box, score, cls in zip(self.boxes.tolist(), self.scores.tolist(), self.classes.tolist(), strict=True):
            item = {"box": box, "score": score, "class_id": cls}
            if names is not None:
                item["label"] = names[cls] if 0 <= cls < len(names) else str(cls)
            out.append(item)
        return out

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))


def yolox_grids(input_hw: tuple[int, int], strides: Sequence[int] = (8, 16, 32)) -> tuple[np.ndarray, np.ndarray]:
    """Grid cell ``(x, y)`` [N, 2] and stride [N] for every YOLOX anchor, in output order."""
    h, w = input_hw
    cells, steps = [], []
    for s in strides:
        gh, gw = h // s, w // s
        ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        cells.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        steps.append(np.full(gh * gw, s))
    return np.concatenate(cells).astype(np.float32), np.concatenate(steps).astype(np.float32)


def _cxcywh_to_xyxy(cxcywh: np.ndarray) -> np.ndarray:
    cx, cy, w, h = cxcywh[:, 0], cxcywh[:, 1], cxcywh[:, 2], cxcywh[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1).astype(np.float32)


def decode(
    pred: np.ndarray,
    layout: str = "yolox",
    input_hw: tuple[int, int] | None = None,
    strides: Sequence[int] = (8, 16, 32),
) -> tuple[np.ndarray, np.ndarray]:
    """One image's raw output → (boxes xyxy [N, 4], class scores [N, C]).

    ``input_hw`` (the network input size) is needed for ``"yolox"`` to rebuild the grids.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown detection layout {layout!r}; expected one of {LAYOUTS}")
    p = np.asarray(pred, dtype=np.float32)
    if p.ndim == 3:
        if p.shape[0] != 1:
            raise ValueError(f"decode takes one image; got a batch of {p.shape[0]}")
        p = p[0]
    if layout == "yolov8":
        p = p.T  # [4 + C, N] → [N, 4 + C]
        return _cxcywh_to_xyxy(p[:, :4]), p[:, 4:]
    if layout == "yolox":
        if input_hw is None:
            raise ValueError("YOLOX decode needs input_hw, the network input (height, width)")
        grid, stride = yolox_grids(input_hw, strides)
        if grid.shape[0] != p.shape[0]:
            raise ValueError(
                f"YOLOX output has {p.shape[0]} anchors but input {tuple(input_hw)} with strides "
                f"{tuple(strides)} gives {grid.shape[0]}"
            )
        s = stride[:, None]
        xy = (p[:, :2] + grid) * s
        # exp overflows float32 only for absurd raw values; clipping keeps boxes finite.
        wh = np.exp(np.minimum(p[:, 2:4], 30.0)) * s
        boxes = _cxcywh_to_xyxy(np.concatenate([xy, wh], axis=1))
    else:
        boxes = _cxcywh_to_xyxy(p[:, :4])
    return boxes, p[:, 4:5] * p[:, 5:]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix [len(a), len(b)] of xyxy boxes."""
    a = np.asarray(a, np.float32).reshape(-1, 4)
    b = np.asarray(b, np.float32).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, max_keep: int | None = None) -> np.ndarray:
    """Greedy NMS; indices of kept boxes, highest score first."""
    order = np.argsort(-scores, kind="stable")
    boxes = np.asarray(boxes, np.float32)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def batched_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float, max_keep: int | None = None
) -> np.ndarray:
    """Class-aware NMS: boxes of different classes never suppress each other.

    Each class's boxes are shifted by a class-specific offset larger than any coordinate, so
    one NMS pass does all classes without a Python loop over them.
    """
    if boxes.shape[0] == 0:
        return np.zeros((0,), np.int64)
    span = float(np.abs(boxes).max()) + 1.0
    shifted = boxes + (classes.astype(np.float32) * 2 * span)[:, None]
    return nms(shifted, scores, iou_threshold, max_keep)


def postprocess(
    pred: np.ndarray,
    layout: str = "yolox",
    input_hw: tuple[int, int] | None = None,
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    class_agnostic: bool = False,
    multi_label: bool = False,
    strides: Sequence[int] = (8, 16, 32),
) -> list[Detections]:
    """Decode + threshold + NMS for each image of a batch (``pred`` [B, N, 5+C] or one image).

    Each anchor keeps its best class unless ``multi_label`` (then every class above the
    threshold is a candidate).
    """
    p = np.asarray(pred)
    batch = p[None] if p.ndim == 2 else p
    results = []
    for item in batch:
        boxes, cls_scores = decode(item, layout, input_hw, strides)
        if multi_label:
            anchor, cls = np.nonzero(cls_scores > score_threshold)
            scores = cls_scores[anchor, cls]
        else:
            cls = np.argmax(cls_scores, axis=1) if cls_scores.shape[1] else np.zeros(len(boxes), np.int64)
            scores = cls_scores[np.arange(len(cls)), cls] if cls_scores.shape[1] else np.zeros(len(boxes), np.float32)
            anchor = np.nonzero(scores > score_threshold)[0]
            cls, scores = cls[anchor], scores[anchor]
        b = boxes[anchor]
        if class_agnostic:
            keep = nms(b, scores, iou_threshold, max_detections)
        else:
            keep = batched_nms(b, scores, cls, iou_threshold, max_detections)
        results.append(Detections(b[keep], scores[keep].astype(np.float32), cls[keep].astype(np.int64)))
    return results


def unletterbox(
    boxes: np.ndarray, ratio: float, pad: tuple[float, float] = (0.0, 0.0), image_hw: tuple[int, int] | None = None
) -> np.ndarray:
    """Map boxes from a letterboxed input back to the original image.

    ``ratio`` is the resize factor applied to the image, ``pad`` the (left, top) padding
    (zero for YOLOX's top-left anchored letterbox); ``image_hw`` clips to the image.
    """
    out = np.asarray(boxes, np.float32).copy()
    out[:, [0, 2]] = (out[:, [0, 2]] - pad[0]) / ratio
    out[:, [1, 3]] = (out[:, [1, 3]] - pad[1]) / ratio
    if image_hw is not None:
        h, w = image_hw
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
    return out


def match_f1(reference: Detections, candidate: Detections, iou_threshold: float = 0.5) -> tuple[int, int, int]:
    """Greedy matching (candidate by descending score, same class, IoU ≥ threshold).

    Returns (true positives, number of candidates, number of references).
    """
    n_c, n_r = len(candidate), len(reference)
    if n_c == 0 or n_r == 0:
        return 0, n_c, n_r
    iou = box_iou(candidate.boxes, reference.boxes)
    iou[candidate.classes[:, None] != reference.classes[None, :]] = 0.0
    taken = np.zeros(n_r, dtype=bool)
    tp = 0
    for i in np.argsort(-candidate.scores, kind="stable"):
        row = np.where(taken, -1.0, iou[i])
        j = int(np.argmax(row))
        if row[j] >= iou_threshold:
            taken[j] = True
            tp += 1
    return tp, n_c, n_r


def precision_recall_f1(tp: int, n_candidate: int, n_reference: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of matched counts (no boxes on a side counts as perfect for it)."""
    precision = tp / n_candidate if n_candidate else (1.0 if n_reference == 0 else 0.0)
    recall = tp / n_reference if n_reference else (1.0 if n_candidate == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)
