"""The calibration commands as a user runs them with `--config <model dir>`: the served model's
[preprocess] (and input name, task, YOLO settings) instead of retyped flags, flags still winning;
and evaluate / sensitivity / calibrate alike on a model with a fixed batch of 1 (YOLOX-Nano)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.interop.conftest import ROOT

ZOO = Path(os.environ.get("TEGRAD_ZOO", ROOT.parent / "shared" / "zoo"))
YOLOX_CONFIG = """
max_batch = 0

[preprocess]
input = "image"
size = [416, 416]
resize = "letterbox"
anchor = "top-left"
pad_value = 114
color = "BGR"
layout = "NCHW"

[postprocess]
kind = "yolo"
variant = "yolox"
score_threshold = 0.3
"""


def _tegrad(*args):
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, timeout=600)


def _images(src: Path, dest: Path, n: int) -> Path:
    dest.mkdir(parents=True)
    for f in sorted(src.glob("*.jpg"))[:n]:
        shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture
def yolox(tmp_path):
    onnx_file = ZOO / "models" / "yolox_nano.onnx"
    if not onnx_file.is_file() or not (ZOO / "images" / "coco_val2017").is_dir():
        pytest.skip(f"YOLOX-Nano or COCO images of the benchmark zoo not found under {ZOO} (set TEGRAD_ZOO)")
    model = tmp_path / "yolox"
    (model / "1").mkdir(parents=True)
    shutil.copy(onnx_file, model / "1" / "model.onnx")
    (model / "config.toml").write_text(YOLOX_CONFIG)
    return model, _images(ZOO / "images" / "coco_val2017", tmp_path / "images", 3)


def test_calibrate_and_evaluate_yolox_from_its_config(yolox, tmp_path):
    model, images = yolox
    onnx_file = str(model / "1" / "model.onnx")
    cache = tmp_path / "yolox.calib.json"
    done = _tegrad("calibrate", onnx_file, "--config", str(model), "--data", str(images), "--batch-size", "4",
                   "--algorithm", "max", "-o", str(cache), "--no-progress")
    assert done.returncode == 0, done
    assert f"using {model / 'config.toml'}: [preprocess], task" in done.stderr, done.stderr
    recorded = json.loads(cache.read_text())["preprocess"]
    assert recorded["color"] == "BGR" and recorded["resize"] == "letterbox" and recorded["anchor"] == "top-left"
    assert recorded["size"] == [416, 416] and recorded["pad_value"] == [114.0]

    int8 = tmp_path / "yolox.int8.onnx"
    assert _tegrad("quantize", onnx_file, "--cache", str(cache), "--target", "cpu", "-o", str(int8)).returncode == 0
    done = _tegrad("evaluate", onnx_file, str(int8), "--config", str(model), "--data", str(images), "--no-progress")
    assert done.returncode == 0, done
    assert "Got invalid dimensions" not in done.stderr and "Traceback" not in done.stderr
    assert "fixed batch of 1" in done.stderr
    result = json.loads(done.stdout)
    assert result["task"] == "detection" and result["samples"] == 3, result


def test_explicit_flags_win_over_the_config(yolox, tmp_path):
    model, images = yolox
    cache = tmp_path / "rgb.calib.json"
    done = _tegrad("calibrate", str(model / "1" / "model.onnx"), "--config", str(model / "config.toml"),
                   "--data", str(images), "--color", "RGB", "--algorithm", "max", "-o", str(cache), "--no-progress")
    assert done.returncode == 0, done
    recorded = json.loads(cache.read_text())["preprocess"]
    assert recorded["color"] == "RGB" and recorded["resize"] == "letterbox"


def _fixed_batch_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], rng.standard_normal(108).astype(np.float32))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "fixed", [x], [y], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return path


def test_fixed_batch_of_one_works_alike_in_calibrate_sensitivity_and_evaluate(tmp_path):
    model = str(_fixed_batch_model(tmp_path / "fixed.onnx"))
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(1).standard_normal((6, 3, 6, 6)).astype(np.float32))
    cache = tmp_path / "fixed.calib.json"
    common = ("--data", str(data), "--batch-size", "4", "--no-progress")
    done = _tegrad("calibrate", model, *common, "--algorithm", "max", "-o", str(cache))
    assert done.returncode == 0, done
    assert json.loads(cache.read_text())["preprocess"] is None  # tensors: no preprocessing to record
    # --state: the default row file is ./<model>.sensitivity.jsonl, in the test's working directory.
    done = _tegrad("sensitivity", model, "--cache", str(cache), "--state", str(tmp_path / "rows.jsonl"), *common)
    assert done.returncode == 0 and "fixed batch of 1" in done.stderr, done
    done = _tegrad("evaluate", model, model, *common)
    assert done.returncode == 0 and "fixed batch of 1" in done.stderr, done
    assert json.loads(done.stdout)["samples"] == 6


def test_config_that_does_not_exist_is_one_line(tmp_path):
    from tests.interop.conftest import DIGITS

    # Only --config is missing: the model exists, so the line is about the config.
    done = _tegrad("calibrate", str(DIGITS / "1" / "model.onnx"), "--config", str(tmp_path / "nope"),
                   "--data", str(tmp_path))
    assert done.returncode == 2 and "--config" in done.stderr, done
    assert "does not exist" in done.stderr or "no such file" in done.stderr, done
    assert len(done.stderr.strip().splitlines()) == 1, done
    assert "Traceback" not in done.stderr


def test_quantize_takes_precision_cache_and_target_from_the_config(tmp_path):
    from tests.interop.conftest import DIGITS

    model = tmp_path / "digits"
    shutil.copytree(DIGITS, model)
    text = (model / "config.toml").read_text().replace('precision = "fp32"', 'precision = "int8"\ncalibration_cache = "calib.json"')
    (model / "config.toml").write_text(text)
    out = tmp_path / "digits.int8.onnx"
    done = _tegrad("quantize", str(model / "1" / "model.onnx"), "--config", str(model), "-o", str(out))
    assert done.returncode == 0, done
    assert "precision, calibration_cache, backend" in done.stderr and "int8, target cpu" in done.stdout, done
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "Cast" not in ops  # the CPU target keeps FP32 glue
    done = _tegrad("quantize", str(model / "1" / "model.onnx"), "--config", str(model), "--precision", "fp16",
                   "-o", str(tmp_path / "fp16.onnx"))
    assert done.returncode == 0 and "fp16" in done.stdout, done
