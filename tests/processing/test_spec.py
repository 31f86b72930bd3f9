from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from calib.preprocess import PRESETS, PreprocessSpec
from daemon.engines.base import TensorSpec
from daemon.processing.spec import PostprocessConfig, PreprocessConfig, bind_input, bind_output

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

CLASSIFIER = """
[preprocess]
input = "image"
size = [224, 224]
resize = "center-crop"
resize_short = 256
color = "RGB"
mean = 127.0
std = 128.0

[postprocess]
kind = "classification"
softmax = true
top_k = 5
labels = "labels.txt"
"""

DETECTOR = """
[preprocess]
format = "raw"
size = 416
resize = "letterbox"
anchor = "top-left"
pad_value = 114
color = "BGR"

[postprocess]
kind = "yolo"
variant = "yolox"
score_threshold = 0.3
iou_threshold = 0.45
max_detections = 50
"""


def _messages(exc: ValidationError) -> str:
    return " | ".join(".".join(map(str, e["loc"])) + ": " + e["msg"] for e in exc.errors())


def test_toml_examples_match_the_zoo_presets():
    cls = tomllib.loads(CLASSIFIER)
    pre = PreprocessConfig.model_validate(cls["preprocess"])
    assert pre.to_spec() == PRESETS["efficientnet-lite0"]
    assert pre.client_input() == TensorSpec("image", "BYTES", (-1,))
    det = tomllib.loads(DETECTOR)
    pre = PreprocessConfig.model_validate(det["preprocess"])
    assert pre.to_spec() == PRESETS["yolox"].replace(size=(416, 416))
    assert pre.client_input(1) == TensorSpec("image", "UINT8", (1, -1, -1, 3))
    post = PostprocessConfig.model_validate(det["postprocess"])
    assert (post.variant, post.max_detections, post.class_agnostic) == ("yolox", 50, False)


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ({}, "size", "Field required"),
        ({"size": [0, 10]}, "size", "positive"),
        ({"size": 8, "mean": 0.5}, "", "mean and std must be given together"),
        ({"size": 8, "mean": 1, "std": 2, "scale": 3}, "", "either mean/std or scale/offset"),
        ({"size": 8, "color": "GRAY", "mean": [1, 2, 3], "std": 1}, "", "expected 1 or 1 values for color GRAY"),
        ({"size": 8, "mean": [1, 2], "std": 1}, "", "expected 1 or 3 values"),
        ({"size": 8, "std": [1, 0, 1], "mean": 0}, "", "std: must not contain 0"),
        ({"size": 8, "resize": "fill"}, "resize", "'stretch'"),
        ({"size": 8, "resize_short": 10}, "", "resize_short: only applies to resize = 'center-crop'"),
        ({"size": 8, "pad_value": 300}, "", "pad_value: pixel values are 0..255"),
        ({"size": 8, "format": "png"}, "format", "'encoded'"),
        ({"size": 8, "colour": "RGB"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_preprocess_errors_name_the_key(table, key, words):
    with pytest.raises(ValidationError) as err:
        PreprocessConfig.model_validate(table)
    text = _messages(err.value)
    assert words in text
    if key:
        assert text.startswith(key)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"kind": "detect"}, "'classification'"),
        ({"kind": "yolo"}, "variant: required for kind = 'yolo'"),
        ({"kind": "yolo", "variant": "yolov8", "top_k": 3}, "top_k: applies to kind = 'classification'"),
        ({"kind": "classification", "iou_threshold": 0.5}, "iou_threshold: applies to kind = 'yolo'"),
        ({"kind": "raw", "softmax": True}, "softmax: applies to kind = 'classification'"),
        ({"kind": "classification", "top_k": 0}, "greater than or equal to 1"),
        ({"kind": "yolo", "variant": "yolov5", "score_threshold": 1.5}, "less than or equal to 1"),
        ({"kind": "yolo", "variant": "yolov5", "strides": [8, 16]}, "strides: applies to variant = 'yolox'"),
        ({"kind": "yolo", "variant": "yolox", "strides": []}, "strides: expected a non-empty list"),
    ],
)
def test_postprocess_errors_name_the_key(table, words):
    with pytest.raises(ValidationError) as err:
        PostprocessConfig.model_validate(table)
    assert words in _messages(err.value)


def test_output_specs_per_kind():
    model_out = [TensorSpec("logits", "FP32", (-1, 1000))]
    cls = PostprocessConfig(kind="classification", top_k=5, labels="labels.txt")
    assert cls.output_specs(model_out) == [
        TensorSpec("scores", "FP32", (-1, 5)),
        TensorSpec("classes", "INT32", (-1, 5)),
        TensorSpec("labels", "BYTES", (-1, 5)),
    ]
    assert [s.name for s in PostprocessConfig(kind="classification").output_specs(model_out)] == ["scores", "classes"]
    det = PostprocessConfig(kind="yolo", variant="yolov8", max_detections=20)
    assert det.output_specs(model_out, batch=1) == [
        TensorSpec("boxes", "FP32", (1, 20, 4)),
        TensorSpec("scores", "FP32", (1, 20)),
        TensorSpec("classes", "INT32", (1, 20)),
        TensorSpec("count", "INT32", (1,)),
    ]
    assert PostprocessConfig(kind="raw").output_specs(model_out) == model_out


def test_labels_file_is_read_relative_to_the_model_dir(tmp_path):
    (tmp_path / "labels.txt").write_text("cat\n\ndog\n", encoding="utf-8")
    assert PostprocessConfig(kind="classification", labels="labels.txt").load_labels(tmp_path) == ("cat", "dog")
    with pytest.raises(ValueError, match="labels: cannot read"):
        PostprocessConfig(kind="classification", labels="missing.txt").load_labels(tmp_path)


def test_bind_input_checks_shape_dtype_and_names():
    pre = PreprocessConfig(size=(224, 224), mean=127.0, std=128.0)
    good = TensorSpec("input", "FP32", (-1, 3, 224, 224))
    assert bind_input(pre, [good]) == good
    with pytest.raises(ValueError, match=r"samples of shape \[3, 224, 224\] \(NCHW\).*\[-1, 224, 224, 3\]"):
        bind_input(pre, [TensorSpec("input", "FP32", (-1, 224, 224, 3))])
    with pytest.raises(ValueError, match="dtype: is float32 but model input 'input' is FP16"):
        bind_input(pre, [TensorSpec("input", "FP16", (-1, 3, 224, 224))])
    two = [good, TensorSpec("mask", "FP32", (-1, 1))]
    with pytest.raises(ValueError, match="model_input: the model has 2 inputs"):
        bind_input(pre, two)
    assert bind_input(pre.model_copy(update={"model_input": "input"}), two) == good
    with pytest.raises(ValueError, match="no input 'images'"):
        bind_input(pre.model_copy(update={"model_input": "images"}), two)


def test_bind_output_checks_kind():
    logits = TensorSpec("logits", "FP32", (-1, 10))
    assert bind_output(PostprocessConfig(kind="classification", top_k=5), [logits]) == logits
    with pytest.raises(ValueError, match="top_k: 20 is more than the 10 classes"):
        bind_output(PostprocessConfig(kind="classification", top_k=20), [logits])
    with pytest.raises(ValueError, match=r"\[N, anchors, 5 \+ classes\]"):
        bind_output(PostprocessConfig(kind="yolo", variant="yolox"), [logits])
    assert bind_output(PostprocessConfig(kind="raw"), [logits]) is None


def test_spec_round_trips_through_calib():
    pre = PreprocessConfig(size=[32, 48], resize="letterbox", anchor="center", pad_value=[1, 2, 3],
                           scale=1 / 255, offset=[0.0, 0.1, 0.2], layout="NHWC", dtype="float16")
    spec = pre.to_spec()
    assert isinstance(spec, PreprocessSpec)
    assert spec.input_shape == (32, 48, 3)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
