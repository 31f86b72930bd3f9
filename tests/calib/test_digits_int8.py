"""The embedded digits CNN lowered to INT8 and mixed precision keeps FP32 accuracy (±1 point)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from calib import lower as L
from calib.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[2] / "daemon" / "models" / "digits"
MODEL = ROOT / "1" / "model.onnx"
HELDOUT = ROOT / "data" / "heldout.npz"
CALIB = ROOT / "data" / "calib.npz"

pytestmark = pytest.mark.skipif(
    not (MODEL.exists() and HELDOUT.exists() and CALIB.exists()), reason="digits model or data not present"
)


def _x(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.float32) / 16.0)[:, None]  # model input: pixel / 16, [N, 1, 8, 8]


@pytest.fixture(scope="module")
def observations():
    from calib.observe import observe

    return observe(onnx.load(MODEL), _x(np.load(CALIB)["x"]), progress=False)


@pytest.fixture(scope="module")
def heldout_batches():
    held = np.load(HELDOUT)
    x, y = _x(held["x"]), held["y"]
    return [x[i : i + 64] for i in range(0, len(x), 64)], y


@pytest.fixture(scope="module")
def setup(observations, heldout_batches):
    from calib.algorithms import compute_all

    return onnx.load(MODEL), compute_all(observations, "max"), *heldout_batches


@pytest.mark.parametrize("method", ["max", "entropy", "percentile", "mse"])
def test_every_algorithm_keeps_accuracy(observations, heldout_batches, method):
    # The input takes 17 discrete levels (pixel/16); clipping methods must leave it alone.
    from calib.algorithms import compute_all

    amax = compute_all(observations, method)
    assert amax["input"] == pytest.approx(1.0)
    batches, y = heldout_batches
    model = onnx.load(MODEL)
    result = evaluate(model, L.lower(model, "int8", amax=amax, target="cpu"), batches, labels=y)
    assert abs(result.accuracy_candidate - result.accuracy_reference) <= 0.01, result.as_dict()


@pytest.mark.parametrize(
    "precision,kwargs",
    [
        ("int8", {}),
        ("int8", {"target": "cpu"}),
        ("mixed", {}),
        ("mixed", {"exclude_precision": "fp32", "target": "cpu"}),
    ],
)
def test_digits_int8_accuracy_within_one_point(setup, precision, kwargs):
    model, amax, batches, y = setup
    if precision == "mixed":  # the first and last layers, the usual suspects
        weighted = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
        kwargs = {**kwargs, "exclude": [weighted[0], weighted[-1]]}
    lowered = L.lower(model, precision, amax=amax, **kwargs)
    counts = L.count_precisions(lowered)
    assert counts["int8"] == (5 if precision == "int8" else 3)
    result = evaluate(model, lowered, batches, labels=y)
    assert result.accuracy_reference > 0.9
    assert abs(result.accuracy_candidate - result.accuracy_reference) <= 0.01, result.as_dict()
    assert result.top1_agreement >= 0.97


def test_default_observations_lower_any_single_layer_cpu_graph(observations):
    # Any exclusion set must lower from one cache: the CPU variant may requantize a
    # weighted layer's own output once its consumer is excluded.
    from calib.algorithms import compute_all
    from calib.sensitivity import quantizable_layers

    model = onnx.load(MODEL)
    amax = compute_all(observations, "max")
    layers = [name for name, _ in quantizable_layers(model)]
    for keep in layers:
        lowered = L.lower(model, "mixed", amax=amax, exclude=[n for n in layers if n != keep],
                          exclude_precision="fp32", target="cpu")
        assert L.count_precisions(lowered)["int8"] == 1
