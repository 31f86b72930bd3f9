"""Calibration cache: JSON, TensorRT text, model checks."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from calib.cache import (
    CacheMismatchError,
    CalibrationCache,
    amax_to_scale,
    hex_to_scale,
    model_sha256,
    scale_to_hex,
    sha256_file,
)

# A realistic trtexec/DeepStream-style cache (hex = big-endian float32 bits of amax/127).
TRT_TEXT = (
    "TRT-8600-EntropyCalibration2\n"
    "input: 3c010204\n"
    "/conv1/Conv_output_0: 3d8f5c29\n"
    "onnx::Conv_123: 3e1a2b3c\n"
    "/layer1/layer1.0/relu/Relu_output_0: 3c9d8a7f\n"
    "(Unnamed Layer* 42) [Shuffle]_output: 3d0c6a12\n"
    "odd: name: with colons: 3b808081\n"
    "output: 3f4ccccd\n"
)


def _model(names=("input", "/conv1/Conv_output_0", "output")) -> onnx.ModelProto:
    x = helper.make_tensor_value_info(names[0], TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info(names[-1], TensorProto.FLOAT, [1, 4])
    nodes = []
    prev = names[0]
    for i, n in enumerate(names[1:]):
        nodes.append(helper.make_node("Relu", [prev], [n], name=f"relu{i}"))
        prev = n
    g = helper.make_graph(nodes, "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_hex_scale_known_answer() -> None:
    assert hex_to_scale("3c010204") == np.float32(1 / 127)
    assert scale_to_hex(amax_to_scale(1.0)) == "3c010204"
    c = CalibrationCache.from_trt_text("TRT-8600-EntropyCalibration2\ninput: 3c010204\n")
    assert c.amax["input"] == pytest.approx(1.0, rel=1e-7)
    assert scale_to_hex(1e-35) == "554ad2e"  # TensorRT does not zero-pad
    assert scale_to_hex(1e-35, pad=True) == "0554ad2e"


def test_trt_text_round_trip_byte_exact(tmp_path) -> None:
    cache = CalibrationCache.from_trt_text(TRT_TEXT)
    assert list(cache.amax) == ["input", "/conv1/Conv_output_0", "onnx::Conv_123",
                                "/layer1/layer1.0/relu/Relu_output_0", "(Unnamed Layer* 42) [Shuffle]_output",
                                "odd: name: with colons", "output"]
    assert cache.to_trt_text() == TRT_TEXT
    # Through JSON on disk and back.
    path = tmp_path / "c.json"
    cache.save(path)
    again = CalibrationCache.load(path)
    assert again.to_trt_text() == TRT_TEXT
    assert again.model_sha256 is None and again.source["trt_version"] == "8600"
    # A TRT file loads by content and saves by extension.
    trt_path = tmp_path / "calib.cache"
    trt_path.write_bytes(TRT_TEXT.encode())
    loaded = CalibrationCache.load(trt_path)
    out = tmp_path / "out.cache"
    loaded.save(out)
    assert out.read_bytes() == TRT_TEXT.encode()


def test_trt_round_trip_of_odd_writers() -> None:
    no_newline = "TRT-100300-MinMaxCalibration\na: 3C010204\nb: 0554AD2E"
    assert CalibrationCache.from_trt_text(no_newline).to_trt_text() == no_newline
    crlf = TRT_TEXT.replace("\n", "\r\n")
    assert CalibrationCache.from_trt_text(crlf).to_trt_text() == crlf
    c = CalibrationCache.from_trt_text(TRT_TEXT)
    assert c.to_trt_text(trt_version="100300", algorithm="MinMaxCalibration").startswith(
        "TRT-100300-MinMaxCalibration\ninput: 3c010204\n")


def test_native_cache_exports_default_header() -> None:
    c = CalibrationCache({"x": 1.0, "y": 2.54}, algorithm="entropy", model_sha256="0" * 64)
    text = c.to_trt_text()
    assert text.splitlines()[0] == "TRT-100300-EntropyCalibration2"
    (bits,) = struct.unpack(">I", struct.pack(">f", np.float32(2.54 / 127)))
    assert text.splitlines()[2] == f"y: {bits:x}"


@pytest.mark.parametrize("text,msg", [
    ("", "header"),
    ("TRT-abc-Entropy\n", "header"),
    ("TRT-8600-EntropyCalibration2\nno separator\n", "line 2"),
    ("TRT-8600-EntropyCalibration2\nx: zz\n", "line 2"),
    ("TRT-8600-EntropyCalibration2\nx: 3c010204\nx: 3c010204\n", "twice"),
    ("TRT-8600-EntropyCalibration2\nx: 7fc00000\n", "finite"),
])
def test_trt_parse_errors(text: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        CalibrationCache.from_trt_text(text)


def test_json_layout_and_atomic_save(tmp_path) -> None:
    c = CalibrationCache({"input": 1.0, "/conv1/Conv_output_0": 3.25}, algorithm="percentile",
                         params={"percentile": 99.99}, num_samples=108, model_sha256="ab" * 32,
                         preprocess={"size": [224, 224]}, source={"kind": "images", "count": 108})
    path = tmp_path / "model.calib.json"
    c.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "tegrad-calib" and doc["format_version"] == 1
    assert doc["amax"] == {"input": 1.0, "/conv1/Conv_output_0": 3.25}
    assert doc["algorithm"] == "percentile" and doc["params"] == {"percentile": 99.99}
    assert doc["num_samples"] == 108 and doc["model_sha256"] == "ab" * 32
    assert doc["preprocess"] == {"size": [224, 224]} and "created" in doc and "tegrad_version" in doc
    assert CalibrationCache.load(path) == c
    assert sorted(os.listdir(tmp_path)) == ["model.calib.json"]  # no temp file left behind
    c.save(path)  # overwrite in place
    assert CalibrationCache.load(path) == c


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(format="other"), "format"),
    (lambda d: d.update(format_version=2), "newer tegrad"),
    (lambda d: d.update(amax={}), "amax"),
    (lambda d: d.update(amax={"x": "big"}), "'x'"),
    (lambda d: d.update(model_sha256="xyz"), "model_sha256"),
])
def test_json_validation(tmp_path, mutate, msg) -> None:
    d = CalibrationCache({"x": 1.0}, algorithm="max").to_dict()
    mutate(d)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=msg):
        CalibrationCache.load(path)


def test_check_against_hash_and_names(tmp_path) -> None:
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert sha256_file(path) == model_sha256(model) == model_sha256(str(path))
    good = CalibrationCache({"input": 1.0, "/conv1/Conv_output_0": 2.0}, "entropy", model_sha256=model_sha256(model))
    good.check_against(model)
    good.check_against(path, required_tensors=["input"])

    other = _model(("input", "/conv1/Conv_output_0", "mid", "output"))
    with pytest.raises(CacheMismatchError) as exc:
        good.check_against(other)
    assert model_sha256(model)[:12] in str(exc.value) and model_sha256(other)[:12] in str(exc.value)

    extra = CalibrationCache({"input": 1.0, "/gone/Relu_output_0": 2.0}, "entropy",
                             model_sha256=model_sha256(model))
    with pytest.raises(CacheMismatchError, match="/gone/Relu_output_0"):
        extra.check_against(model)
    with pytest.raises(CacheMismatchError, match="'output'"):
        good.check_against(model, required_tensors=["input", "output"])


def test_imported_trt_cache_checks_names_only() -> None:
    cache = CalibrationCache.from_trt_text(
        "TRT-8600-EntropyCalibration2\ninput: 3c010204\n(Unnamed Layer* 3) [Shuffle]_output: 3c010204\n")
    cache.check_against(_model())  # no hash; TensorRT-internal names are ignored
    cache.check_against(_model(("input", "a", "b", "output")))
    missing = CalibrationCache.from_trt_text("TRT-8600-EntropyCalibration2\nonnx::Conv_123: 3c010204\n")
    with pytest.raises(CacheMismatchError, match="onnx::Conv_123"):
        missing.check_against(_model())


def test_trt_header_names_the_closest_calibrator() -> None:
    from calib.cache import CalibrationCache

    amax = {"input": 1.0}
    assert CalibrationCache(amax=amax, algorithm="max").to_trt_text().startswith("TRT-100300-MinMaxCalibration\n")
    assert CalibrationCache(amax=amax, algorithm="entropy").to_trt_text().startswith("TRT-100300-EntropyCalibration2\n")


def test_preprocess_differences_compare_what_moves_value_ranges() -> None:
    from calib.cache import preprocess_differences

    lite = {"size": [224, 224], "resize": "center-crop", "color": "RGB", "mean": [127.0], "std": [128.0]}
    # mean/std and scale/offset spelling the same affine map, one value or one per channel: no difference
    same = {**lite, "mean": None, "std": None, "scale": [1 / 128] * 3, "offset": [-127 / 128] * 3, "layout": "NHWC"}
    assert preprocess_differences(lite, same) == []
    assert preprocess_differences(lite, {**lite, "interpolation": "cubic", "dtype": "float16"}) == []
    diffs = preprocess_differences(lite, {**lite, "color": "BGR", "size": 240, "resize": "letterbox", "std": [64.0]})
    assert diffs == ["color: cache RGB, served BGR", "size: cache [224, 224], served [240, 240]",
                     "resize: cache center-crop, served letterbox",
                     "normalisation: cache mean=[127.0], std=[128.0], served mean=[127.0], std=[64.0]"]
