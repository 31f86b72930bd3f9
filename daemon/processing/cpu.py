"""Pre- and post-processing with OpenCV and NumPy: the reference the GPU path must reproduce.

Preprocessing is :func:`calib.preprocess.preprocess`, image by image; detection reuses
:mod:`calib.detection`'s decoders and NMS. Class-aware NMS runs per class rather than through
``calib.detection.batched_nms``: that function offsets each class's boxes by a large constant,
which rounds the float32 coordinates and can move an IoU across the threshold, and the GPU
kernels compare classes instead. Ties in score are broken by anchor order in both paths.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Executor

import numpy as np

from calib.detection import decode, nms
from calib.preprocess import Transform, preprocess
from daemon.errors import InvalidArgument
from daemon.processing.images import decode_batch, load_batch, map_items
from daemon.processing.spec import PostprocessConfig, PreprocessConfig


class CpuPreprocessor:
    """Client images to one input batch; ``pool`` (optional) spreads images over threads."""

    def __init__(self, config: PreprocessConfig, pool: Executor | None = None) -> None:
        self.config = config
        self.spec = config.to_spec()
        self.pool = pool

    def decode(self, batch: np.ndarray) -> list[np.ndarray]:
        return decode_batch(batch, self.config, self.pool)

    def load(self, batch: np.ndarray) -> list[np.ndarray]:
        return load_batch(batch, self.config, self.pool)

    def run(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Transform]]:
        """BGR uint8 images to ``[N, *spec.input_shape]`` and each image's box transform."""
        spec = self.spec
        out = np.empty((len(images), *spec.input_shape), dtype=np.float16 if spec.dtype == "float16" else np.float32)

        def one(i: int, image: np.ndarray) -> Transform:
            out[i], transform = preprocess(image, spec)
            return transform

        return out, map_items(self.pool, one, list(images))

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, list[Transform]]:
        return self.run(self.load(batch))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def label_tensor(classes: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    """BYTES tensor of the label of each class id (the id itself past the labels file; b"" for -1)."""
    names = [name.encode() for name in labels]
    out = np.empty(classes.shape, dtype=object)
    flat = out.reshape(-1)
    for i, c in enumerate(classes.reshape(-1).tolist()):
        flat[i] = names[c] if 0 <= c < len(names) else (b"" if c < 0 else str(c).encode())
    return out


def classify(logits: np.ndarray, top_k: int, use_softmax: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row (best first, ties by lower index) and its scores; padded past the class count."""
    x = np.asarray(logits, dtype=np.float32).reshape(logits.shape[0], -1)
    n, c = x.shape
    k = min(top_k, c)
    order = np.argsort(-x, axis=1, kind="stable")[:, :k]
    values = softmax(x) if use_softmax else x
    scores = np.zeros((n, top_k), np.float32)
    classes = np.full((n, top_k), -1, np.int32)
    scores[:, :k] = np.take_along_axis(values, order, axis=1)
    classes[:, :k] = order
    return scores, classes


def select(
    boxes: np.ndarray, class_scores: np.ndarray, config: PostprocessConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's decoded anchors to its final detections: best class per anchor, score
    threshold, NMS (per class unless class_agnostic), at most max_detections, best first."""
    if class_scores.shape[1] == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32)
    cls = np.argmax(class_scores, axis=1)
    scores = class_scores[np.arange(len(cls)), cls]
    anchor = np.nonzero(scores > np.float32(config.score_threshold))[0]
    b, s, c = boxes[anchor], scores[anchor], cls[anchor]
    k, iou = config.max_detections, config.iou_threshold
    if config.class_agnostic:
        keep = nms(b, s, iou, k)
    else:
        parts = [np.zeros(0, np.int64)]
        for label in np.unique(c):
            idx = np.nonzero(c == label)[0]
            parts.append(idx[nms(b[idx], s[idx], iou, k)])
        keep = np.concatenate(parts)
        keep = keep[np.lexsort((keep, -s[keep]))][:k]
    return b[keep], s[keep].astype(np.float32), c[keep].astype(np.int32)


class CpuPostprocessor:
    """Model outputs to the KServe tensors of the configured kind (see daemon.processing.spec).

    ``input_hw`` is the model input (height, width), needed by YOLOX to rebuild its grids.
    """

    def __init__(
        self, config: PostprocessConfig, labels: Sequence[str] = (), input_hw: tuple[int, int] | None = None
    ) -> None:
        if config.kind == "yolo" and config.variant == "yolox" and input_hw is None:
            raise ValueError("postprocess: YOLOX decoding needs the model input size (a [preprocess] size)")
        self.config = config
        self.labels = tuple(labels)
        self.input_hw = input_hw

    def _output(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        name = self.config.output
        if name is None:
            if len(outputs) != 1:
                raise InvalidArgument(f"postprocess: the model returned {len(outputs)} outputs; name one in output")
            return next(iter(outputs.values()))
        if name not in outputs:
            raise InvalidArgument(f"postprocess: the model returned no output {name!r}")
        return outputs[name]

    def run(
        self, outputs: Mapping[str, np.ndarray], transforms: Sequence[Transform] | None = None
    ) -> dict[str, np.ndarray]:
        cfg = self.config
        if cfg.kind == "raw":
            return dict(outputs)
        pred = np.asarray(self._output(outputs), dtype=np.float32)
        if cfg.kind == "classification":
            scores, classes = classify(pred, cfg.top_k, cfg.softmax)
            result = {"scores": scores, "classes": classes}
            if cfg.labels is not None:
                result["labels"] = label_tensor(classes, self.labels)
            return result
        return self._detect(pred, transforms)

    def _detect(self, pred: np.ndarray, transforms: Sequence[Transform] | None) -> dict[str, np.ndarray]:
        cfg = self.config
        n, k = pred.shape[0], cfg.max_detections
        if transforms is not None and len(transforms) != n:
            raise InvalidArgument(f"postprocess: {n} outputs for {len(transforms)} images")
        boxes = np.zeros((n, k, 4), np.float32)
        scores = np.zeros((n, k), np.float32)
        classes = np.full((n, k), -1, np.int32)
        count = np.zeros(n, np.int32)
        for i in range(n):
            decoded, class_scores = decode(pred[i], cfg.variant, self.input_hw, cfg.strides)
            b, s, c = select(decoded, class_scores, cfg)
            if transforms is not None:
                b = transforms[i].to_original(b).astype(np.float32)
            m = len(s)
            boxes[i, :m], scores[i, :m], classes[i, :m], count[i] = b, s, c, m
        result = {"boxes": boxes, "scores": scores, "classes": classes, "count": count}
        if cfg.labels is not None:
            result["labels"] = label_tensor(classes, self.labels)
        return result
