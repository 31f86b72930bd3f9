"""The ``[preprocess]`` and ``[postprocess]`` tables of a model's ``config.toml``.

A model with a ``[preprocess]`` table takes images from clients instead of tensors: either
encoded JPEG/PNG files (``format = "encoded"``, a BYTES tensor of shape ``[N]`` or ``[N, 1]``)
or decoded frames (``format = "raw"``, UINT8 ``[N, H, W, 3]`` in BGR order, as OpenCV and
most cameras deliver them). The geometry, colour and normalisation keys are those of
:class:`calib.preprocess.PreprocessSpec`, so that a model is served with exactly the
tensors it was calibrated on.

A ``[postprocess]`` table turns the model's output into tensors any Triton client reads:

- ``kind = "classification"``: ``scores`` FP32 ``[N, k]`` (probabilities when ``softmax``,
  else the raw outputs), ``classes`` INT32 ``[N, k]``, and ``labels`` BYTES ``[N, k]`` when
  a labels file is given; best first, ties by lower class index.
- ``kind = "yolo"``: ``boxes`` FP32 ``[N, K, 4]`` (x1, y1, x2, y2: corners in pixels of the
  original image when the client sent images, of the network input when it sent the model's
  tensor; not clipped to the image), ``scores`` FP32 ``[N, K]``, ``classes`` INT32 ``[N, K]``,
  ``count`` INT32 ``[N]``, and ``labels`` BYTES ``[N, K]`` (each detection's class name) when a
  labels file is given; ``K = max_detections``, best first; rows past ``count`` hold zeros,
  class -1 and an empty label.
- ``kind = "raw"``: the model's outputs unchanged.

Errors are ``ValueError`` naming the key; the server prefixes the config file path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from calib.preprocess import DEFAULT_MAX_PIXELS, PreprocessSpec
from daemon.tensor_spec import TensorSpec

# Keys shared with calib's PreprocessSpec; everything else in the table is serving-only.
_SPEC_KEYS = (
    "size", "resize", "resize_short", "anchor", "pad_value", "interpolation", "color",
    "mean", "std", "scale", "offset", "layout", "dtype",
)
_CLASSIFICATION_KEYS = ("softmax", "top_k")
_YOLO_KEYS = ("variant", "score_threshold", "iou_threshold", "max_detections", "class_agnostic", "strides")
_MODEL_DTYPES = {"float32": "FP32", "float16": "FP16"}

Floats = float | list[float]


class _Strict(BaseModel):
    # Same policy as daemon.config (not imported from there: config.py imports this module).
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessConfig(_Strict):
    """How client images become the model's input tensor; see the module docstring."""

    input: str = Field(default="image", min_length=1)
    format: Literal["encoded", "raw"] = "encoded"
    model_input: str | None = None
    # A decompression-bomb guard: a 1 MB PNG can claim gigapixels. Checked from the header, and on
    # every intermediate image (center-crop of a 1x20000 strip to a 256 short side is 256x5120000).
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)
    max_aspect_ratio: float = Field(default=100.0, ge=1.0)

    size: int | tuple[int, int]
    resize: Literal["stretch", "letterbox", "center-crop"] = "stretch"
    resize_short: int | None = Field(default=None, ge=1)
    anchor: Literal["top-left", "center"] = "center"
    pad_value: Floats = 0.0
    interpolation: Literal["linear", "nearest", "cubic", "area"] = "linear"
    color: Literal["RGB", "BGR", "GRAY"] = "RGB"
    mean: Floats | None = None
    std: Floats | None = None
    scale: Floats | None = None
    offset: Floats | None = None
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16"] = "float32"

    @field_validator("size")
    @classmethod
    def _positive_size(cls, size: int | tuple[int, int]) -> tuple[int, int]:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if any(s < 1 for s in hw):
            raise ValueError(f"expected positive (height, width), got {list(hw)}")
        return hw

    @model_validator(mode="after")
    def _valid_spec(self) -> PreprocessConfig:
        try:
            self.to_spec()
        except ValueError as exc:
            # calib says "preprocess.<key>: ..."; pydantic already puts us under "preprocess".
            raise ValueError(str(exc).removeprefix("preprocess.")) from None
        return self

    def to_spec(self) -> PreprocessSpec:
        values = {key: getattr(self, key) for key in _SPEC_KEYS}
        return PreprocessSpec(**values)

    @property
    def model_datatype(self) -> str:
        return _MODEL_DTYPES[self.dtype]

    def client_input(self, batch: int = -1) -> TensorSpec:
        """The tensor clients send, for ModelMetadata (``batch`` = -1 when the model batches)."""
        if self.format == "encoded":
            return TensorSpec(self.input, "BYTES", (batch,))
        return TensorSpec(self.input, "UINT8", (batch, -1, -1, 3))


class PostprocessConfig(_Strict):
    """What the model's output becomes; see the module docstring for the tensors of each kind."""

    kind: Literal["classification", "yolo", "raw"]
    output: str | None = None

    softmax: bool = False
    top_k: int = Field(default=1, ge=1, le=100_000)
    labels: str | None = Field(default=None, min_length=1)

    variant: Literal["yolox", "yolov5", "yolov8"] | None = None
    score_threshold: float = Field(default=0.25, ge=0.0, le=1.0)
    iou_threshold: float = Field(default=0.45, ge=0.0, le=1.0)
    max_detections: int = Field(default=100, ge=1, le=10_000)
    class_agnostic: bool = False
    # YOLOX only: the strides of its output grids, in output order.
    strides: tuple[int, ...] = (8, 16, 32)

    @model_validator(mode="after")
    def _keys_fit_kind(self) -> PostprocessConfig:
        given = self.model_fields_set
        for kind, keys in (("classification", _CLASSIFICATION_KEYS), ("yolo", _YOLO_KEYS)):
            stray = [k for k in keys if k in given and self.kind != kind]
            if stray:
                raise ValueError(f"{stray[0]}: applies to kind = {kind!r}, not {self.kind!r}")
        if self.labels is not None and self.kind == "raw":
            raise ValueError("labels: applies to kind = 'classification' or 'yolo', not 'raw'")
        if self.kind == "yolo" and self.variant is None:
            raise ValueError("variant: required for kind = 'yolo' (one of 'yolox', 'yolov5', 'yolov8')")
        if "strides" in given and self.variant != "yolox":
            raise ValueError("strides: applies to variant = 'yolox' only (YOLOv5/v8 outputs hold pixel boxes)")
        if not self.strides or any(s < 1 for s in self.strides):
            raise ValueError("strides: expected a non-empty list of positive integers")
        return self

    def detection_params(self, preprocess: PreprocessConfig | None) -> dict[str, Any] | None:
        """calib's detection options (decode, NMS) for a yolo postprocess, or None for other kinds:
        what golden-sample validation and the live precision monitor compare boxes with."""
        if self.kind != "yolo":
            return None
        params: dict[str, Any] = {"layout": self.variant, "score_threshold": self.score_threshold,
                                  "iou_threshold": self.iou_threshold, "max_detections": self.max_detections,
                                  "class_agnostic": self.class_agnostic}
        if self.output is not None:
            params["output"] = self.output
        if self.variant == "yolox":
            params["strides"] = tuple(self.strides)
            if preprocess is not None:
                params["input_hw"] = tuple(preprocess.to_spec().size)
        return params

    def load_labels(self, model_dir: Path) -> tuple[str, ...]:
        """The labels file, one label per line, relative to the model directory (() if none)."""
        if self.labels is None:
            return ()
        path = Path(model_dir) / self.labels
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"labels: cannot read {path}: {exc.strerror or exc}") from None
        return tuple(line.strip() for line in text.splitlines() if line.strip())

    def output_specs(self, model_outputs: Sequence[TensorSpec], batch: int = -1) -> list[TensorSpec]:
        """The tensors clients get back, for ModelMetadata (``batch`` = -1 when the model batches)."""
        if self.kind == "raw":
            return list(model_outputs)
        if self.kind == "classification":
            k = self.top_k
            specs = [TensorSpec("scores", "FP32", (batch, k)), TensorSpec("classes", "INT32", (batch, k))]
            if self.labels is not None:
                specs.append(TensorSpec("labels", "BYTES", (batch, k)))
            return specs
        k = self.max_detections
        specs = [
            TensorSpec("boxes", "FP32", (batch, k, 4)),
            TensorSpec("scores", "FP32", (batch, k)),
            TensorSpec("classes", "INT32", (batch, k)),
            TensorSpec("count", "INT32", (batch,)),
        ]
        if self.labels is not None:
            specs.append(TensorSpec("labels", "BYTES", (batch, k)))
        return specs


def _only(kind: str, name: str | None, specs: Sequence[TensorSpec], key: str) -> TensorSpec:
    by_name = {s.name: s for s in specs}
    if name is not None:
        if name not in by_name:
            raise ValueError(f"{key}: the model has no {kind} {name!r}; its {kind}s are {', '.join(by_name) or 'none'}")
        return by_name[name]
    if len(specs) != 1:
        raise ValueError(f"{key}: the model has {len(specs)} {kind}s ({', '.join(by_name)}); name the one to use")
    return specs[0]


def bind_input(pre: PreprocessConfig, model_inputs: Sequence[TensorSpec]) -> TensorSpec:
    """The model input ``pre`` feeds, checked against the spec's shape and dtype."""
    spec = _only("input", pre.model_input, model_inputs, "preprocess.model_input")
    want = pre.to_spec().input_shape
    dims = tuple(spec.shape[1:]) if len(spec.shape) == len(want) + 1 else None
    if dims is None or any(d >= 0 and d != w for d, w in zip(dims, want)):
        raise ValueError(
            f"preprocess: makes samples of shape {list(want)} ({pre.layout}) but model input {spec.name!r} "
            f"has shape {list(spec.shape)}"
        )
    if spec.datatype != pre.model_datatype:
        raise ValueError(f"preprocess.dtype: is {pre.dtype} but model input {spec.name!r} is {spec.datatype}")
    return spec


def bind_output(post: PostprocessConfig, model_outputs: Sequence[TensorSpec]) -> TensorSpec | None:
    """The model output ``post`` reads (None for kind 'raw'), checked against its kind."""
    if post.kind == "raw":
        return None
    spec = _only("output", post.output, model_outputs, "postprocess.output")
    if spec.datatype not in ("FP32", "FP16"):
        raise ValueError(f"postprocess: output {spec.name!r} is {spec.datatype}; {post.kind} needs FP32 or FP16")
    shape = spec.shape
    if post.kind == "classification":
        if len(shape) < 2:
            raise ValueError(f"postprocess: output {spec.name!r} has shape {list(shape)}, not [N, classes]")
        classes = math.prod(shape[1:]) if all(d > 0 for d in shape[1:]) else None
        if classes is not None and classes < post.top_k:
            raise ValueError(
                f"postprocess.top_k: {post.top_k} is more than the {classes} classes of output {spec.name!r}"
            )
    elif len(shape) != 3:
        raise ValueError(
            f"postprocess: output {spec.name!r} has shape {list(shape)}; {post.variant} outputs are "
            + ("[N, 4 + classes, anchors]" if post.variant == "yolov8" else "[N, anchors, 5 + classes]")
        )
    return spec
