"""Where the resized image lands on the model's input canvas, without touching pixels.

The GPU kernel resizes and places an image in one pass, so it needs the sizes and offsets
that :func:`calib.preprocess.preprocess` arrives at while it works. They are computed here
with the same integer and float arithmetic as calib (tests check that the transforms agree
for many sizes); calib stays the single definition of the pixels themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from calib.preprocess import PreprocessSpec, Transform


@dataclass(frozen=True)
class Placement:
    """The source is resized to ``resized_hw``, whose pixel (0, 0) lands on canvas pixel
    ``offset_yx`` (negative when a crop cuts it); canvas pixels it does not cover are padding."""

    resized_hw: tuple[int, int]
    offset_yx: tuple[int, int]
    transform: Transform


def plan(src_hw: tuple[int, int], spec: PreprocessSpec) -> Placement:
    src_h, src_w = int(src_hw[0]), int(src_hw[1])
    H, W = spec.size
    if spec.resize == "stretch":
        return Placement((H, W), (0, 0), Transform((src_h, src_w), W / src_w, H / src_h, 0.0, 0.0))

    if spec.resize == "letterbox":
        r = min(H / src_h, W / src_w)
        new_h = min(H, max(1, int(src_h * r)))
        new_w = min(W, max(1, int(src_w * r)))
        top, left = (0, 0) if spec.anchor == "top-left" else ((H - new_h) // 2, (W - new_w) // 2)
        transform = Transform((src_h, src_w), new_w / src_w, new_h / src_h, float(left), float(top))
        return Placement((new_h, new_w), (top, left), transform)

    short = min(src_h, src_w)
    if spec.resize_short is None:
        r = max(H / src_h, W / src_w)
        new_h = max(H, int(math.ceil(src_h * r - 1e-9)))
        new_w = max(W, int(math.ceil(src_w * r - 1e-9)))
    elif src_h <= src_w:
        new_h, new_w = spec.resize_short, (spec.resize_short * src_w) // short
    else:
        new_h, new_w = (spec.resize_short * src_h) // short, spec.resize_short
    pad_h, pad_w = max(0, H - new_h), max(0, W - new_w)
    pad_top, pad_left = pad_h // 2, pad_w // 2
    top = int(round((new_h + pad_h - H) / 2.0))
    left = int(round((new_w + pad_w - W) / 2.0))
    dy, dx = pad_top - top, pad_left - left
    transform = Transform((src_h, src_w), new_w / src_w, new_h / src_h, float(dx), float(dy))
    return Placement((new_h, new_w), (dy, dx), transform)
