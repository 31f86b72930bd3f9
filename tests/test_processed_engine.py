"""ProcessedEngine: the model's pre/post-processing around a real ONNX Runtime engine, per slot,
on the CPU and (gpu marker) on the GPU with the same results."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.config import parse_model_config
from daemon.engines.onnxruntime import runner
from daemon.errors import ConfigError, InvalidArgument
from daemon.pipeline.processed import ProcessedEngine
from tests.engines.conftest import DIGITS
from tests.onnx_models import DETECTOR_CONFIG, fixed_detector

CLASSIFIER = """max_batch = 8
instances = 2
[preprocess]
input = "image"
size = [8, 8]
resize = "stretch"
color = "GRAY"
scale = 0.00392156862745098
[postprocess]
kind = "classification"
softmax = true
top_k = 3
labels = "labels.txt"
"""


def _build(tmp_path: Path, text: str, model: Path, device: str):
    config = parse_model_config(f'processing_device = "{device}"\n' + text, tmp_path / "config.toml", "m")
    (tmp_path / "labels.txt").write_text("\n".join(str(i) for i in range(10)))
    pool = ThreadPoolExecutor(2)
    return ProcessedEngine(runner.load(model, config, tmp_path, engine_id="t"), config, tmp_path, pool)


def _digits(n: int) -> tuple[list[bytes], np.ndarray]:
    held = np.load(DIGITS / "data" / "heldout.npz")
    files = [cv2.imencode(".png", cv2.resize((d.astype(np.int32) * 255 // 16).astype(np.uint8), (32, 32),
                                             interpolation=cv2.INTER_NEAREST))[1].tobytes() for d in held["x"][:n]]
    return files, held["y"][:n]


def _run(engine: ProcessedEngine, files: list[bytes], slot: int = 0) -> dict[str, np.ndarray]:
    batch = np.array(files, dtype=object)
    inputs = asyncio.run(engine.admit({"image": batch}))
    return engine.infer(inputs, slot)


def test_classifier_specs_stages_and_results(tmp_path):
    engine = _build(tmp_path, CLASSIFIER, DIGITS / "1" / "model.onnx", "cpu")
    assert [(t.name, t.datatype, t.shape, t.optional) for t in engine.inputs] == [
        ("image", "BYTES", (-1,), True), ("input", "FP32", (-1, 1, 8, 8), True)]
    assert [t.name for t in engine.outputs] == ["scores", "classes", "labels"]
    files, y = _digits(16)
    out = _run(engine, files, slot=1)
    assert (out["classes"][:, 0] == y).mean() >= 0.9
    pre, infer, post = engine.stage_ns(1)
    assert pre > 0 and infer > 0 and post > 0
    assert engine.stage_ns(0) == (0, 0, 0), "stages are per slot"


def test_admit_refuses_both_or_neither_form_and_bad_images(tmp_path):
    engine = _build(tmp_path, CLASSIFIER, DIGITS / "1" / "model.onnx", "cpu")
    files, _ = _digits(1)
    tensor = np.zeros((1, 1, 8, 8), np.float32)
    with pytest.raises(InvalidArgument, match="not both"):
        asyncio.run(engine.admit({"image": np.array(files, dtype=object), "input": tensor}))
    with pytest.raises(InvalidArgument, match="neither was sent"):
        asyncio.run(engine.admit({}))
    with pytest.raises(InvalidArgument, match="batch index 1 of 2"):
        asyncio.run(engine.admit({"image": np.array([files[0], b"junk"], dtype=object)}))
    assert asyncio.run(engine.admit({"input": tensor})) == {"input": tensor}


def test_config_that_does_not_fit_the_model_is_a_config_error(tmp_path):
    text = CLASSIFIER.replace("size = [8, 8]", "size = [16, 16]")
    with pytest.raises(ConfigError, match=r"config.toml: preprocess: makes samples of shape \[1, 16, 16\]"):
        _build(tmp_path, text, DIGITS / "1" / "model.onnx", "cpu")


@pytest.mark.gpu
def test_gpu_processing_gives_the_cpu_results(tmp_path):
    text = CLASSIFIER.replace('resize = "stretch"', 'resize = "stretch"\ninterpolation = "linear"')
    for d in ("c", "g"):
        (tmp_path / d).mkdir()
    cpu = _build(tmp_path / "c", text, DIGITS / "1" / "model.onnx", "cpu")
    gpu = _build(tmp_path / "g", text, DIGITS / "1" / "model.onnx", "gpu")
    files, _ = _digits(8)
    a, b = _run(cpu, files), _run(gpu, files, slot=1)
    assert (a["classes"] == b["classes"]).all() and (a["labels"] == b["labels"]).all()
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-6)
    assert all(ns > 0 for ns in gpu.stage_ns(1))

    model = tmp_path / "det" / "1" / "model.onnx"
    fixed_detector(model)
    det_c = _build(tmp_path / "det", DETECTOR_CONFIG, model, "cpu")
    det_g = _build(tmp_path / "det", DETECTOR_CONFIG, model, "gpu")
    image = np.full((64, 128, 3), 40, np.uint8)
    frames = [cv2.imencode(".png", image)[1].tobytes()] * 2
    c, g = _run(det_c, frames), _run(det_g, frames)
    assert list(c["count"]) == list(g["count"]) == [2, 2] and (c["classes"] == g["classes"]).all()
    np.testing.assert_allclose(c["boxes"], g["boxes"], atol=1e-3)
    np.testing.assert_allclose(c["scores"], g["scores"], rtol=1e-6)
    for e in (cpu, gpu, det_c, det_g):
        e.close()
