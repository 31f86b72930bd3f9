"""calib CLI end to end on a tiny model and real files (no mocks)."""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from calib.cache import CalibrationCache, model_sha256
from calib.cli import build_parser, main, register


def _model(path) -> str:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w"], ["c"], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["y"], name="flat"),
    ]
    g = helper.make_graph(nodes, "cli", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(m, path)
    return str(path)


@pytest.fixture()
def files(tmp_path):
    model = _model(tmp_path / "m.onnx")
    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(1).standard_normal((10, 3, 6, 6)).astype(np.float32))
    return tmp_path, model, str(data)


def test_register_adds_subcommands() -> None:
    parser = argparse.ArgumentParser(prog="tegrad")
    sub = parser.add_subparsers(dest="command")
    register(sub)
    for cmd in (["calibrate", "m.onnx", "--data", "d.npy"], ["quantize", "m.onnx"],
                ["sensitivity", "m.onnx", "--cache", "c", "--data", "d"], ["cache", "convert", "a", "b"],
                ["evaluate", "a.onnx", "b.onnx", "--data", "d"]):
        args = parser.parse_args(cmd)
        assert callable(args.func)


def test_calibrate_npy_writes_json_and_trt(files, capsys) -> None:
    tmp, model, data = files
    out, trt = tmp / "m.calib.json", tmp / "m.cache"
    rc = main(["calibrate", model, "--data", data, "--algorithm", "percentile", "--percentile", "99.9",
               "--batch-size", "4", "-o", str(out), "--trt-out", str(trt), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["algorithm"] == "percentile" and doc["params"] == {"percentile": 99.9}
    assert doc["num_samples"] == 10 and doc["model_sha256"] == model_sha256(model)
    assert doc["preprocess"] is None and "r" in doc["amax"]
    text = trt.read_text()
    assert text.startswith("TRT-100300-EntropyCalibration2\n")
    assert CalibrationCache.from_trt_text(text).amax.keys() == doc["amax"].keys()


def test_calibrate_image_folder_with_preprocessing(files, tmp_path) -> None:
    _, model, _ = files
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        cv2.imwrite(str(imgs / f"{i}.png"), rng.integers(0, 256, (9, 12, 3), dtype=np.uint8))
    out = tmp_path / "c.json"
    rc = main(["calibrate", model, "--data", str(imgs), "--size", "6", "--resize", "letterbox",
               "--pad-value", "114", "--color", "BGR", "--scale", str(1 / 255), "--algorithm", "max",
               "--limit", "2", "-o", str(out), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["num_samples"] == 2
    assert doc["preprocess"]["resize"] == "letterbox" and doc["preprocess"]["size"] == [6, 6]
    assert 0 < doc["amax"]["r"] <= 1.0


def test_calibrate_errors_are_exit_code_2(files, tmp_path, capsys) -> None:
    _, model, _ = files
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    assert main(["calibrate", model, "--data", str(imgs), "--no-progress"]) == 2
    assert "preprocessing" in capsys.readouterr().err
    assert main(["calibrate", model, "--data", str(tmp_path / "missing.npy"), "--no-progress"]) == 2


def test_cache_convert_round_trip(tmp_path) -> None:
    text = "TRT-8600-EntropyCalibration2\ninput: 3c010204\n/conv1/Conv_output_0: 3d8f5c29\nonnx::Conv_123: 3e1a2b3c\n"
    src = tmp_path / "trt.cache"
    src.write_text(text)
    assert main(["cache", "convert", str(src), str(tmp_path / "c.json")]) == 0
    assert main(["cache", "convert", str(tmp_path / "c.json"), str(tmp_path / "back.calib")]) == 0
    assert (tmp_path / "back.calib").read_text() == text
    assert main(["cache", "convert", str(src), str(tmp_path / "noext"), "--to", "json"]) == 0
    assert json.loads((tmp_path / "noext").read_text())["format"] == "tegrad-calib"


def test_quantize_int8_runs_and_checks_cache(files, capsys) -> None:
    pytest.importorskip("calib.lower")
    tmp, model, data = files
    cache = tmp / "c.json"
    assert main(["calibrate", model, "--data", data, "-o", str(cache), "--no-progress"]) == 0
    out = tmp / "m.int8.onnx"
    assert main(["quantize", model, "--cache", str(cache), "--precision", "int8", "-o", str(out)]) == 0
    q = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(data)[:2]
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = sess.run(None, {"x": x})[0]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()

    other = _model(tmp / "other.onnx")
    m = onnx.load(other)
    m.doc_string = "changed"
    onnx.save(m, other)
    assert main(["quantize", other, "--cache", str(cache), "-o", str(tmp / "x.onnx")]) == 2
    assert "sha256" in capsys.readouterr().err
    assert main(["quantize", model, "--precision", "int8", "-o", str(tmp / "y.onnx")]) == 2


def test_evaluate_prints_result(files, capsys) -> None:
    pytest.importorskip("calib.evaluate")
    _, model, data = files
    assert main(["evaluate", model, model, "--data", data, "--batch-size", "5"]) == 0
    out = capsys.readouterr().out
    doc = json.loads(out[out.index("{"):])
    assert doc


def test_build_parser_help() -> None:
    assert "calibrate" in build_parser().format_help()


def test_sensitivity_ranks_and_plans(files, capsys) -> None:
    pytest.importorskip("calib.sensitivity")
    tmp, model, data = files
    cache = tmp / "c.json"
    assert main(["calibrate", model, "--data", data, "-o", str(cache), "--no-progress"]) == 0
    report = tmp / "sens.json"
    rc = main(["sensitivity", model, "--cache", str(cache), "--data", data, "--max-samples", "6",
               "--json", str(report), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "conv" in out and "suggested exclusion" in out
    doc = json.loads(report.read_text())
    assert doc["plan"]["total_layers"] == 1 and [r["layer"] for r in doc["report"]["rows"]] == ["conv"]
