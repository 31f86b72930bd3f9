"""Small fixtures made on the fly: images, encoded files and detector outputs with known boxes."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

from calib.detection import yolox_grids


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Gradients plus blobs: a photo-like image whose resized values are not all at rounding edges."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def encode(image: np.ndarray, ext: str = ".jpg") -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def zero_sized_png() -> bytes:
    """A well-formed PNG container whose header claims a 0x0 image."""
    ihdr = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")


def tiny_gif() -> bytes:
    """A 1x1 GIF89a: header, screen descriptor with a 2-colour table, one image, trailer."""
    return (
        b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
        + b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00" + b";"
    )


def craft_yolo(variant: str, dets, input_hw=(64, 64), classes: int = 3, strides=(8, 16, 32)) -> np.ndarray:
    """One image's raw output holding ``dets`` = [(anchor, (x1, y1, x2, y2), cls, score)], zeros elsewhere.

    YOLOv5/YOLOX rows get objectness = score and class score 1.0, so score = obj x cls = score.
    """
    if variant == "yolox":
        grid, stride = yolox_grids(input_hw, strides)
        anchors = grid.shape[0]
    else:
        anchors = 100
    if variant == "yolov8":
        out = np.zeros((4 + classes, anchors), np.float32)
    else:
        out = np.zeros((anchors, 5 + classes), np.float32)
    for anchor, (x1, y1, x2, y2), cls, score in dets:
        cx, cy, w, h = (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1
        if variant == "yolov8":
            out[:4, anchor] = (cx, cy, w, h)
            out[4 + cls, anchor] = score
        else:
            if variant == "yolox":
                s = stride[anchor]
                cx, cy = cx / s - grid[anchor, 0], cy / s - grid[anchor, 1]
                w, h = np.log(w / s), np.log(h / s)
            out[anchor, :4] = (cx, cy, w, h)
            out[anchor, 4] = score
            out[anchor, 5 + cls] = 1.0
    return out


def random_yolo(variant: str, rng: np.random.Generator, input_hw=(128, 128), classes: int = 5) -> np.ndarray:
    """A plausible random output: many overlapping boxes of a few classes, scores spread over [0, 1)."""
    if variant == "yolox":
        grid, stride = yolox_grids(input_hw)
        anchors = grid.shape[0]
    else:
        anchors = 600
    H, W = input_hw
    cx = rng.uniform(0, W, anchors).astype(np.float32)
    cy = rng.uniform(0, H, anchors).astype(np.float32)
    w = rng.uniform(4, W / 3, anchors).astype(np.float32)
    h = rng.uniform(4, H / 3, anchors).astype(np.float32)
    cls = rng.uniform(0, 1, (anchors, classes)).astype(np.float32)
    obj = rng.uniform(0, 1, anchors).astype(np.float32)
    if variant == "yolov8":
        return np.concatenate([np.stack([cx, cy, w, h]), (cls * obj[:, None]).T]).astype(np.float32)
    if variant == "yolox":
        cx, cy = cx / stride - grid[:, 0], cy / stride - grid[:, 1]
        w, h = np.log(w / stride), np.log(h / stride)
    return np.concatenate([np.stack([cx, cy, w, h, obj], axis=1), cls], axis=1).astype(np.float32)
