"""Staged validation on real ONNX Runtime engines: the digits classifier, a tiny detector, a scaler."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import helper

from calib.cache import CalibrationCache
from calib.lower import lower
from daemon.config import ModelConfig, parse_model_config
from daemon.engines.onnxruntime import runner
from daemon.rollout.bundle import open_bundle, validation_for
from daemon.rollout.make import create
from daemon.rollout.validate import ValidationReport, bundle_detection, validate, validate_bundle
from tests import onnx_models

DIGITS = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"
CREATED = "2026-01-02T03:04:05Z"
GOLDEN = 32


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validate")


@pytest.fixture(scope="module")
def bundle(work):
    with np.load(DIGITS / "data" / "heldout.npz") as z:
        x = (z["x"][:GOLDEN].astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    create(DIGITS, work / "digits.tegrad", golden_inputs=x, golden_count=GOLDEN, created=CREATED)
    # Unsigned is enough here: signatures are test_bundle's business, validation starts after them.
    return open_bundle(work / "digits.tegrad", None, allow_unsigned=True)


def _engine(path: Path, config: ModelConfig, model_dir: Path):
    return runner.load(path, config, model_dir, engine_id="t")


@pytest.fixture(scope="module")
def fp32(bundle):
    return _engine(DIGITS / "1" / "model.onnx", bundle.config, DIGITS)


@pytest.fixture(scope="module")
def int8(bundle, work):
    amax = CalibrationCache.load(DIGITS / "calib.json").amax
    path = work / "int8.onnx"
    onnx.save(lower(str(DIGITS / "1" / "model.onnx"), "int8", amax), str(path))
    return _engine(path, bundle.config, DIGITS)


@pytest.fixture(scope="module")
def negated(bundle, work):
    """The digits model with its logits negated: every argmax lands on the least likely class."""
    model = onnx.load(str(DIGITS / "1" / "model.onnx"))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{out}_raw" if o == out else o for o in node.output]
    model.graph.node.append(helper.make_node("Neg", [f"{out}_raw"], [out]))
    path = work / "negated.onnx"
    onnx.save(model, str(path))
    return _engine(path, bundle.config, DIGITS)


class Wrapped:
    """A bad engine: another engine's outputs passed through ``change``."""

    def __init__(self, engine, change) -> None:
        self.engine, self.change, self.inputs = engine, change, engine.inputs

    def infer(self, feeds, slot=0):
        return self.change(self.engine.infer(feeds, slot))


class Raising:
    def infer(self, feeds, slot=0):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def _check(bundle, engine, **kw) -> ValidationReport:
    return validate(engine, bundle.golden_inputs, bundle.golden_outputs, bundle.manifest.validation, **kw)


# ---- classification ------------------------------------------------------------------------------
def test_fp32_engine_passes_with_full_agreement(bundle, fp32):
    report = asyncio.run(validate_bundle(bundle, fp32))
    assert report.passed and report.failures == []
    assert report.task == "classification" and report.samples == GOLDEN
    assert report.scores["top1_agreement"] == 1.0 and report.scores["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert set(report.scores) == {"top1_agreement", "cosine"}
    assert report.thresholds == {"min_top1_agreement": 0.99, "min_cosine": 0.99}
    assert report.seconds > 0 and report.summary().startswith("validation passed (classification, 32 samples")


@pytest.mark.parametrize("batch", [None, 5])
def test_int8_engine_passes_the_default_thresholds(bundle, int8, batch):
    report = _check(bundle, int8, batch=batch)
    assert report.passed, report.summary()
    assert report.scores["top1_agreement"] >= 0.99 and report.scores["cosine"] >= 0.99


def test_negated_logits_fail_naming_metric_and_threshold(bundle, negated):
    report = asyncio.run(validate_bundle(bundle, negated))
    assert not report.passed
    assert report.scores["top1_agreement"] == 0.0 and report.scores["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert report.failures == ["top-1 agreement 0.0000 < 0.99", "cosine -1.0000 < 0.99"]
    assert "FAILED" in report.summary() and "top-1 agreement 0.0000 < 0.99" in report.summary()


def test_shuffled_logits_fail(bundle, fp32):
    rng = np.random.default_rng(0)
    bad = Wrapped(fp32, lambda out: {k: rng.permuted(v, axis=1) for k, v in out.items()})
    report = _check(bundle, bad)
    assert not report.passed and report.scores["top1_agreement"] < 0.99
    assert any(f.startswith("top-1 agreement ") and f.endswith(" < 0.99") for f in report.failures)


def test_a_raising_engine_gives_a_failed_report(bundle):
    report = asyncio.run(validate_bundle(bundle, Raising()))
    assert not report.passed and report.scores == {} and report.samples == GOLDEN
    assert report.failures == ["the engine failed on the golden inputs: RuntimeError: CUDA error: "
                               "an illegal memory access was encountered"]


def test_a_missing_output_is_a_failure(bundle, fp32):
    report = _check(bundle, Wrapped(fp32, lambda out: {"probs": out["logits"]}))
    assert not report.passed
    assert report.failures == ["output 'logits' is missing from the engine's results (it gave ['probs'])"]


def test_a_wrong_shape_is_a_failure(bundle, fp32):
    report = _check(bundle, Wrapped(fp32, lambda out: {"logits": out["logits"][:, :5]}))
    assert report.failures == ["output 'logits' has shape [32, 5], the golden output [32, 10]"]


def test_nan_outputs_fail(bundle, fp32):
    report = _check(bundle, Wrapped(fp32, lambda out: {"logits": np.full_like(out["logits"], np.nan)}))
    assert not report.passed and "cosine 0.0000 < 0.99" in report.failures  # calib scores NaN vectors 0


def test_report_round_trips_through_json(bundle, negated):
    report = _check(bundle, negated)
    text = json.dumps(report.to_dict(), allow_nan=False)
    again = ValidationReport.from_dict(json.loads(text))
    assert again == report and again.summary() == report.summary()


# ---- regression ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scalers(work):
    config = ModelConfig(name="scale", max_batch=8)
    return {f: _engine(onnx_models.scale(work / f"scale{f}.onnx", f), config, work) for f in (1.03, 1.2)}


@pytest.mark.parametrize("factor, passed", [(1.03, True), (1.2, False)])
def test_regression_max_relative_error(scalers, factor, passed):
    x = np.random.default_rng(1).standard_normal((12, 4)).astype(np.float32)
    report = validate(scalers[factor], {"x": x}, {"y": x}, validation_for("regression", max_rel_error=0.05), batch=8)
    assert report.passed is passed and report.task == "regression"
    assert report.scores["max_rel_error"] == pytest.approx(factor - 1, rel=1e-4)
    # A pure scale error keeps the direction: cosine alone would never catch it.
    assert report.scores["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert report.failures == ([] if passed else ["max relative error 0.2000 > 0.05"])
    assert report.thresholds == {"min_cosine": 0.99, "max_rel_error": 0.05}


def test_nan_scores_fail_and_serialize_as_null(scalers):
    x = np.ones((3, 4), np.float32)
    nan = Wrapped(scalers[1.03], lambda out: {"y": np.full_like(out["y"], np.nan)})
    report = validate(nan, {"x": x}, {"y": x}, validation_for("regression"))
    assert not report.passed and math.isnan(report.scores["max_rel_error"])
    assert "max relative error nan > 0.05" in report.failures
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert doc["scores"]["max_rel_error"] is None
    assert math.isnan(ValidationReport.from_dict(doc).scores["max_rel_error"])


def test_regression_thresholds_left_unset_are_not_checked(scalers):
    x = np.ones((3, 4), np.float32)
    report = validate(scalers[1.2], {"x": x}, {"y": x}, validation_for("regression", max_rel_error=None))
    assert report.passed and report.thresholds == {"min_cosine": 0.99}
    assert report.scores["max_rel_error"] == pytest.approx(0.2, rel=1e-4)  # reported all the same


# ---- detection -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector(work):
    d = work / "detector"
    onnx_models.fixed_detector(d / "1" / "model.onnx")
    (d / "config.toml").write_text(onnx_models.DETECTOR_CONFIG)
    images = np.random.default_rng(2).random((6, 3, 64, 64), dtype=np.float32)
    create(d, work / "detector.tegrad", golden_inputs=images, validation={"task": "detection"}, created=CREATED)
    vb = open_bundle(work / "detector.tegrad", None, allow_unsigned=True)
    return vb, _engine(d / "1" / "model.onnx", vb.config, d)


def test_detector_scores_f1_with_the_configs_decoding(detector):
    vb, engine = detector
    report = asyncio.run(validate_bundle(vb, engine))
    assert report.passed and report.scores["f1"] == 1.0 and report.thresholds == {"min_f1": 0.9}


def test_shifted_boxes_fail_detection_f1(detector):
    vb, engine = detector

    def shift(out):
        y = out["output0"].copy()
        y[:, 0] += 30  # every box's cx moves far enough that no IoU reaches 0.5
        return {"output0": y}

    report = asyncio.run(validate_bundle(vb, Wrapped(engine, shift)))
    assert not report.passed and report.scores["f1"] == 0.0
    assert report.failures == ["detection F1 0.0000 < 0.9"]


def test_yolox_options_come_from_the_config():
    config = parse_model_config('max_batch = 1\n[preprocess]\nsize = [64, 96]\n[postprocess]\nkind = "yolo"\n'
                                'variant = "yolox"\nstrides = [8, 16]\noutput = "dets"\n', Path("c.toml"), "m")
    assert bundle_detection(SimpleNamespace(config=config)) == {
        "layout": "yolox", "score_threshold": 0.25, "iou_threshold": 0.45, "max_detections": 100,
        "class_agnostic": False, "output": "dets", "strides": (8, 16), "input_hw": (64, 96)}
