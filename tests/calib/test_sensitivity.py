"""Sensitivity ranking and the precision plan on a model with one fragile layer."""

from __future__ import annotations

import calib_graphs as G
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calib import qdq, sensitivity


def _fragile_model() -> onnx.ModelProto:
    """fc1's input has one feature 1000× larger than the rest, so a per-tensor INT8 grid for
    that input wipes out the other features; fc2 and fc3 see well-behaved activations."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    w1[:, 0] *= 1e-3  # the huge feature contributes normally after fc1
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal((16, 6)).astype(np.float32) * 0.3, "w3"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2"], ["h2"], name="fc2", transB=1),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("MatMul", ["r2", "w3"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes,
        "fragile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def _data(seed, n=64):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    x[:, 0] = 1000.0 + 10 * x[:, 0]
    return x


def test_fragile_layer_ranks_first_and_plan_excludes_it():
    model = _fragile_model()
    amax = G.observe_amax(model, _data(1), qdq.activation_tensors_to_quantize(model))
    batches = [_data(2, 16), _data(3, 16)]
    for method in ("single", "complement"):
        report = sensitivity.analyze(model, amax, batches, max_samples=24, method=method)
        assert report.samples == 24
        assert [r.layer for r in report.rows][0] == "fc1", report.to_table()
        assert {r.layer for r in report.rows} == {"fc1", "fc2", "fc3"}
        assert "fc1" in report.to_table()
    single = sensitivity.analyze(model, amax, batches, method="single")
    worst, rest = single.rows[0], single.rows[1:]
    assert worst.rel_error > 5 * max(r.rel_error for r in rest)
    assert worst.cosine < min(r.cosine for r in rest)

    held_out = [_data(4, 32), _data(5, 32)]
    result = sensitivity.plan(single, model, amax, held_out, min_top1=0.95)
    assert result.met
    assert result.excluded == ["fc1"]
    assert result.total_layers == 3 and result.int8_layers == 2
    assert result.achieved["top1_agreement"] >= 0.95
    assert result.history[0]["top1_agreement"] < 0.95  # full INT8 misses the budget


def test_plan_with_labels_uses_relative_accuracy_drop():
    model = _fragile_model()
    amax = G.observe_amax(model, _data(1), qdq.activation_tensors_to_quantize(model))
    report = sensitivity.analyze(model, amax, [_data(2, 16)])
    x = _data(6, 48)
    labels = G.run(model, x)[0].argmax(axis=1)  # FP32 is right by construction
    result = sensitivity.plan(report, model, amax, [x], labels=labels)
    assert result.met and result.achieved["accuracy_drop"] <= 0.01
    assert "fc1" in result.excluded
