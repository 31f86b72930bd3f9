"""Image preprocessing spec shared by calibration and serving.

A :class:`PreprocessSpec` describes, declaratively, how a decoded image becomes
a model input tensor. Calibration must see exactly the tensors the deployed
model will see, so the daemon reuses this spec (and this CPU implementation is
the reference its GPU path is compared against).

Order of operations, fixed so that every implementation agrees bit for bit:

1. colour conversion of the uint8 BGR image (``RGB`` swaps channels, ``GRAY``
   uses OpenCV's BGR2GRAY weights); per-channel values such as ``pad_value``,
   ``mean`` and ``std`` are therefore in the *output* channel order;
2. geometry on uint8 (stretch, letterbox or resize-short-side + center-crop);
3. conversion to float32 and normalisation, either ``(x - mean) / std`` or
   ``x * scale + offset``;
4. layout (HWC → CHW for ``NCHW``) and final dtype.

Sizes are ``(height, width)`` everywhere, as in NumPy shapes; OpenCV's
``(width, height)`` convention is confined to the ``cv2.resize`` calls.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import simplejpeg

from calib.image_header import READABLE, ImageHeader, ImageHeaderError, read_header, sniff

RESIZE_MODES = ("stretch", "letterbox", "center-crop")
ANCHORS = ("top-left", "center")
INTERPOLATIONS = {
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
}
COLORS = ("RGB", "BGR", "GRAY")
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("float32", "float16")

_FIELDS = (
    "resize",
    "size",
    "resize_short",
    "anchor",
    "pad_value",
    "interpolation",
    "color",
    "mean",
    "std",
    "scale",
    "offset",
    "layout",
    "dtype",
)


def _err(key: str, msg: str) -> ValueError:
    return ValueError(f"preprocess.{key}: {msg}")


def _as_floats(key: str, value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        vals: tuple[float, ...] = (float(value),)
    elif isinstance(value, (list, tuple)) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        vals = tuple(float(v) for v in value)
    else:
        raise _err(key, f"expected a number or a non-empty list of numbers, got {value!r}")
    if not all(math.isfinite(v) for v in vals):
        raise _err(key, f"values must be finite, got {value!r}")
    return vals


def _choice(key: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise _err(key, f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes a model input tensor (without the batch dimension).

    ``size`` is the model input ``(height, width)``. For ``center-crop`` the
    short side is first resized to ``resize_short`` (default: just enough to
    cover ``size``), then the central ``size`` window is cut out. For
    ``letterbox`` the image is scaled by ``min(H/h, W/w)`` and padded with
    ``pad_value`` at the ``anchor``. Normalisation is mean/std *or*
    scale/offset (or none: raw 0..255 values); one value applies to all
    channels, otherwise one per channel.
    """

    size: tuple[int, int]
    resize: str = "stretch"
    resize_short: int | None = None
    anchor: str = "center"
    pad_value: tuple[float, ...] = (0.0,)
    interpolation: str = "linear"
    color: str = "RGB"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: tuple[float, ...] | None = None
    offset: tuple[float, ...] | None = None
    layout: str = "NCHW"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        # Normalise convenient inputs (ints, lists) so that equal specs compare
        # and hash equal, then validate everything once, here.
        size = self.size
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if (
            not isinstance(size, (list, tuple))
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise _err("size", f"expected (height, width) of positive integers, got {self.size!r}")
        object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        _choice("resize", self.resize, RESIZE_MODES)
        _choice("anchor", self.anchor, ANCHORS)
        _choice("interpolation", self.interpolation, tuple(INTERPOLATIONS))
        _choice("color", self.color, COLORS)
        _choice("layout", self.layout, LAYOUTS)
        _choice("dtype", self.dtype, DTYPES)
        if self.resize_short is not None:
            if self.resize != "center-crop":
                raise _err("resize_short", "only applies to resize = 'center-crop'")
            if not isinstance(self.resize_short, int) or isinstance(self.resize_short, bool) or self.resize_short <= 0:
                raise _err("resize_short", f"expected a positive integer, got {self.resize_short!r}")
        channels = self.channels
        for key in ("pad_value", "mean", "std", "scale", "offset"):
            vals = _as_floats(key, getattr(self, key))
            if key == "pad_value" and vals is None:
                vals = (0.0,)
            if vals is not None and len(vals) not in (1, channels):
                raise _err(key, f"expected 1 or {channels} values for color {self.color}, got {len(vals)}")
            object.__setattr__(self, key, vals)
        if (self.mean is None) != (self.std is None):
            raise _err("mean" if self.mean is None else "std", "mean and std must be given together")
        if self.std is not None and any(s == 0 for s in self.std):
            raise _err("std", "must not contain 0")
        if self.mean is not None and (self.scale is not None or self.offset is not None):
            raise _err("scale", "use either mean/std or scale/offset, not both")
        if self.pad_value is not None and any(not 0 <= p <= 255 for p in self.pad_value):
            raise _err("pad_value", f"pixel values are 0..255, got {self.pad_value!r}")

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one preprocessed sample (no batch dimension)."""
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in _FIELDS:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessSpec:
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocess: expected a mapping, got {type(data).__name__}")
        unknown = [k for k in data if k not in _FIELDS]
        if unknown:
            raise _err(unknown[0], f"unknown key (known keys: {', '.join(_FIELDS)})")
        if "size" not in data:
            raise _err("size", "required key is missing")
        kwargs = dict(data)
        if isinstance(kwargs["size"], list):
            kwargs["size"] = tuple(kwargs["size"])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> PreprocessSpec:
        return dataclasses.replace(self, **changes)


#: Reference setups of the benchmark zoo models (see the zoo README).
PRESETS: dict[str, PreprocessSpec] = {
    "efficientnet-lite0": PreprocessSpec(
        size=(224, 224),
        resize="center-crop",
        resize_short=256,
        interpolation="linear",
        color="RGB",
        mean=(127.0,),
        std=(128.0,),
        layout="NCHW",
    ),
    "yolox": PreprocessSpec(
        size=(416, 416),
        resize="letterbox",
        anchor="top-left",
        pad_value=(114.0,),
        interpolation="linear",
        color="BGR",
        layout="NCHW",
    ),
}


@dataclasses.dataclass(frozen=True)
class Transform:
    """Per-axis affine map from original-image pixels to model-input pixels.

    ``x_model = x_orig * scale_x + offset_x`` (same for y), in continuous pixel
    coordinates where pixel ``i`` spans ``[i, i + 1)``. The scales are the
    exact ratios of the resized to the original size, not the nominal
    letterbox ratio, so that mapping back is exact even after rounding the
    resized size to whole pixels.
    """

    src_size: tuple[int, int]
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def to_model(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        b = np.array(boxes_xyxy, dtype=np.float64, copy=True).reshape(-1, 4)
        b[:, 0::2] = b[:, 0::2] * self.scale_x + self.offset_x
        b[:, 1::2] = b[:, 1::2] * self.scale_y + self.offset_y
        return b.reshape(np.shape(boxes_xyxy))

    def to_original(self, boxes_xyxy: np.ndarray, clip: bool = True) -> np.ndarray:
        """Map ``[..., 4]`` boxes (x1, y1, x2, y2) from model input to the original image."""
        b = np.array(boxes_xyxy, dtype=np.float64, copy=True).reshape(-1, 4)
        b[:, 0::2] = (b[:, 0::2] - self.offset_x) / self.scale_x
        b[:, 1::2] = (b[:, 1::2] - self.offset_y) / self.scale_y
        if clip:
            h, w = self.src_size
            b[:, 0::2] = np.clip(b[:, 0::2], 0.0, float(w))
            b[:, 1::2] = np.clip(b[:, 1::2], 0.0, float(h))
        return b.reshape(np.shape(boxes_xyxy))


#: Largest image decoded when the caller names no limit: a 1 MB PNG can claim gigapixels.
DEFAULT_MAX_PIXELS = 40_000_000

# How OpenCV's imdecode applies an EXIF orientation (2-8) to what the decoder wrote.
_ORIENT = {
    2: lambda im: cv2.flip(im, 1),
    3: lambda im: cv2.rotate(im, cv2.ROTATE_180),
    4: lambda im: cv2.flip(im, 0),
    5: cv2.transpose,
    6: lambda im: cv2.rotate(im, cv2.ROTATE_90_CLOCKWISE),
    7: lambda im: cv2.flip(cv2.transpose(im), -1),
    8: lambda im: cv2.rotate(im, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    image: np.ndarray  # BGR uint8 HxWx3
    # Set when the decoder recovered from corrupt data (libjpeg's "premature end of data segment"
    # and the like): the pixels it could not read are filled in, not decoded.
    warning: str | None = None


def _decode_jpeg(data: bytes, header: ImageHeader) -> DecodedImage | None:
    """libjpeg-turbo through simplejpeg, which reports the warnings OpenCV only prints.

    Same library and settings as OpenCV's JPEG decoder (ISLOW IDCT, fancy upsampling), so the
    pixels are identical; only a file that warns is decoded a second time. None where
    TurboJPEG cannot decode it at all (CMYK to BGR, 12-bit): OpenCV then does what it does.
    """
    warning = None
    try:
        img = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True)
    except ValueError as exc:
        try:
            img = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=False)
        except ValueError:
            return None
        warning = str(exc)
    orient = _ORIENT.get(header.orientation)
    return DecodedImage(orient(img) if orient else img, warning)


def decode(data: bytes, header: ImageHeader | None = None) -> DecodedImage:
    """Decode encoded image bytes (JPEG, PNG, BMP, ...) to BGR uint8, with no size check.

    ``header`` is :func:`calib.image_header.read_header` of ``data`` when the caller has it.
    """
    if header is not None and header.format == "JPEG":
        decoded = _decode_jpeg(data, header)
        if decoded is not None:
            return decoded
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from None
    if img is None or img.size == 0:
        raise ValueError(f"cannot decode image ({len(data)} bytes): corrupt or unsupported format")
    return DecodedImage(img)


def decode_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, BMP, ...) to a BGR uint8 HxWx3 array.

    Where the format's header can be read (see :mod:`calib.image_header`), an image of more
    than ``max_pixels`` is refused from the header, before anything is decoded.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"image data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("image data is empty")
    data = bytes(data)
    header = None
    if sniff(data) in READABLE:
        try:
            header = read_header(data)
        except ImageHeaderError:
            if sniff(data) in ("JPEG", "PNG"):
                raise
            # A variant of another format whose header is not read here (BigTIFF, ...): OpenCV decides.
    if header is not None and max_pixels is not None and header.pixels > max_pixels:
        raise ValueError(
            f"image is {header.describe()} ({header.pixels} pixels), more than the limit of {max_pixels} pixels"
        )
    return decode(data, header).image


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read and decode an image file to BGR uint8; ValueError names the file on failure."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_image(data)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None


def _as_bgr(img: np.ndarray) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise ValueError("preprocess expects a uint8 image array")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim == 3 and img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {img.shape}")


def _resize(img: np.ndarray, h: int, w: int, interp: int) -> np.ndarray:
    if img.shape[0] == h and img.shape[1] == w:
        return img
    out = cv2.resize(img, (w, h), interpolation=interp)
    # cv2 drops a trailing channel axis of size 1; keep HWC throughout.
    return out[:, :, None] if out.ndim == 2 else out


def _pad_fill(spec: PreprocessSpec, shape: tuple[int, int, int]) -> np.ndarray:
    canvas = np.empty(shape, dtype=np.uint8)
    # pad values are validated to 0..255; round so that 114.0 and 114 agree.
    canvas[...] = np.array([int(round(p)) for p in spec.pad_value], dtype=np.uint8)
    return canvas


def _resized_size(src_h: int, src_w: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(height, width) the image is resized to before any padding or crop."""
    H, W = spec.size
    if spec.resize == "stretch":
        return H, W
    if spec.resize == "letterbox":
        r = min(H / src_h, W / src_w)
        # Truncation as in the YOLOX reference preprocessing; clamp to >= 1 pixel.
        return min(H, max(1, int(src_h * r))), min(W, max(1, int(src_w * r)))
    # center-crop: scale the short side, then cut the central window.
    short = min(src_h, src_w)
    if spec.resize_short is None:
        # Smallest resize that covers the crop window.
        r = max(H / src_h, W / src_w)
        return max(H, int(math.ceil(src_h * r - 1e-9))), max(W, int(math.ceil(src_w * r - 1e-9)))
    # Integer arithmetic for the long side, matching torchvision's Resize(int)
    # (truncation) without float round-off at exact ratios.
    if src_h <= src_w:
        return spec.resize_short, (spec.resize_short * src_w) // short
    return (spec.resize_short * src_h) // short, spec.resize_short


def intermediate_sizes(src_h: int, src_w: int, spec: PreprocessSpec) -> list[tuple[str, int, int]]:
    """Every image :func:`preprocess` makes from a ``src_h`` x ``src_w`` one, as (what, height, width).

    Known from the source size alone, so a caller can bound their memory before decoding.
    """
    H, W = spec.size
    new_h, new_w = _resized_size(src_h, src_w, spec)
    sizes = [("resized", new_h, new_w)]
    if spec.resize == "letterbox":
        sizes.append(("padded", H, W))
    elif spec.resize == "center-crop" and (new_h < H or new_w < W):
        sizes.append(("padded", max(new_h, H), max(new_w, W)))
    return sizes


def _geometry(img: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Transform]:
    src_h, src_w = img.shape[:2]
    H, W = spec.size
    interp = INTERPOLATIONS[spec.interpolation]
    new_h, new_w = _resized_size(src_h, src_w, spec)
    resized = _resize(img, new_h, new_w, interp)
    if spec.resize == "stretch":
        return resized, Transform((src_h, src_w), W / src_w, H / src_h, 0.0, 0.0)

    if spec.resize == "letterbox":
        if spec.anchor == "top-left":
            top = left = 0
        else:
            top, left = (H - new_h) // 2, (W - new_w) // 2
        canvas = _pad_fill(spec, (H, W, img.shape[2]))
        canvas[top : top + new_h, left : left + new_w] = resized
        return canvas, Transform((src_h, src_w), new_w / src_w, new_h / src_h, float(left), float(top))

    sx, sy = new_w / src_w, new_h / src_h
    if new_h < H or new_w < W:
        # The crop window is larger than the image: pad symmetrically first.
        ph, pw = max(0, H - new_h), max(0, W - new_w)
        canvas = _pad_fill(spec, (new_h + ph, new_w + pw, img.shape[2]))
        canvas[ph // 2 : ph // 2 + new_h, pw // 2 : pw // 2 + new_w] = resized
        resized = canvas
        pad_top, pad_left = ph // 2, pw // 2
    else:
        pad_top = pad_left = 0
    rh, rw = resized.shape[:2]
    top = int(round((rh - H) / 2.0))
    left = int(round((rw - W) / 2.0))
    out = resized[top : top + H, left : left + W]
    return out, Transform((src_h, src_w), sx, sy, float(pad_left - left), float(pad_top - top))


def _channel_vector(vals: tuple[float, ...]) -> np.ndarray:
    return np.asarray(vals, dtype=np.float32)


def preprocess(image: np.ndarray, spec: PreprocessSpec) -> tuple[np.ndarray, Transform]:
    """Turn a BGR uint8 image into one model input sample (no batch dimension).

    Returns the tensor (``spec.input_shape``, ``spec.dtype``, C-contiguous) and
    the :class:`Transform` that maps boxes back to the original image.
    """
    bgr = _as_bgr(image)
    if spec.color == "RGB":
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    elif spec.color == "GRAY":
        img = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)[:, :, None]
    else:
        img = bgr
    geo, transform = _geometry(img, spec)

    x = geo.astype(np.float32)
    if spec.mean is not None and spec.std is not None:
        x -= _channel_vector(spec.mean)
        x /= _channel_vector(spec.std)
    else:
        if spec.scale is not None:
            x *= _channel_vector(spec.scale)
        if spec.offset is not None:
            x += _channel_vector(spec.offset)
    if spec.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    x = np.ascontiguousarray(x, dtype=np.float16 if spec.dtype == "float16" else np.float32)
    return x, transform
